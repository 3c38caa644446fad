"""`config.evals`: the paper's metrics while a diffusion-family stage trains (big_vision style).

    config.evals.fid = dict(kind="t2i", every=30000, num=512, ...)   # FID (+ CLIP score)
    config.evals.shapes = dict(kind="shapes", every=1000, num=512, classifier="runs/classifier")

Each entry with `every` > 0 runs at every multiple of `every` and at the run's last step, on the
stage's EMA model (`Stage.text_to_image`), through the loop `md_jax.evaluation.t2i_eval`
uses: the same captions, noise and metrics, so a figure logged here is the figure the command-line
evaluation of that checkpoint prints. Scalars go to TensorBoard as `eval/<name>/<metric>`; the
per-image rows to `WORKDIR/eval/<name>/<step>/` (a run preempted mid-evaluation resumes it there).

The MobileDiffusion paper compared candidate architectures by FID and CLIP score at 30K training
steps (Sec. 5.1): `--config.evals.fid.every=30000 --config.evals.fid.num=30000` plus the weights.
"""

import flax.linen as nn
import ml_collections
from absl import logging

KINDS = {
  # kind: (FID feature network, what it needs)
  "t2i": "inception",
  "shapes": "shapes_classifier",
}
KEYS = (
  "kind", "every", "num", "batch_size", "sampler", "steps", "cfg", "split", "seed", "fid_weights",
  "clip", "reference_dir", "classifier",
)  # fmt: skip


def default_evals() -> ml_collections.ConfigDict:
  """The entries a diffusion config starts with, off (`every=0`) so that one flag turns each on."""
  common = dict(
    every=0, num=512, batch_size=32, sampler="ddim", steps=50, cfg=3.0, split="validation",
    seed=0, fid_weights="random", clip="", reference_dir="", classifier="",
  )  # fmt: skip
  return ml_collections.ConfigDict(
    {"fid": dict(kind="t2i", **common), "shapes": dict(kind="shapes", **common)}
  )


def check(config) -> None:
  """Every enabled entry of `config.evals` is well-formed: one error naming the key otherwise."""
  import os

  for name, entry in (config.get("evals") or {}).items():
    where = f"config.evals.{name}"
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
      raise ValueError(f"{where}: unknown keys {unknown} (known: {list(KEYS)})")
    if entry.get("kind") not in KINDS:
      raise ValueError(f"{where}.kind={entry.get('kind')!r}: expected one of {sorted(KINDS)}")
    if entry.get("every", 0) <= 0:
      continue
    if entry.get("num", 0) <= 0 or entry.get("batch_size", 0) <= 0:
      raise ValueError(f"{where}: num and batch_size must be positive")
    if entry.kind == "shapes" and not os.path.exists(entry.get("classifier") or ""):
      raise ValueError(f"{where}.classifier={entry.get('classifier')!r}: no such run")
    weights = entry.get("fid_weights", "random")
    if entry.kind == "t2i" and weights != "random" and not os.path.exists(weights):
      raise ValueError(f"{where}.fid_weights={weights!r}: no such file")


class PeriodicEvals:
  """The enabled entries of `config.evals` for one training run."""

  def __init__(self, config, workdir, mesh, rules):
    check(config)
    self.entries = {n: e for n, e in (config.get("evals") or {}).items() if e.get("every", 0) > 0}
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.rules = rules
    self._metrics = {}  # built on first use: loading Inception or CLIP is not free

  def due(self, step: int, last_step: int) -> list[str]:
    return [n for n, e in self.entries.items() if step % e.every == 0 or step == last_step]

  def _build(self, entry, data_config, tokenizer):
    from md_jax.evaluation import feature_networks

    return feature_networks.build_metrics(
      data_config, tokenizer, self.mesh, num_images=entry.num, fid_network=KINDS[entry.kind],
      fid_weights=entry.fid_weights, classifier=entry.classifier or None, clip=entry.clip,
      reference_dir=entry.reference_dir or None,
    )  # fmt: skip

  def run(self, names, stage, state, step: int, writer) -> None:
    from md_jax.evaluation import caption_eval

    models = stage.text_to_image(state)
    if models is None:
      raise ValueError(f"config.evals: a {type(stage).__name__} generates no images to evaluate")
    pipeline, params = models
    for name in names:
      entry = self.entries[name]
      data_config = self.config.data.copy_and_resolve_references()
      data_config.split = entry.split
      data_config.resolution = pipeline.resolution
      if entry.kind == "shapes":  # the labels the shapes metric reads
        from md_jax.data.shapes_scene import LABEL_NAMES

        data_config.label_keys = tuple(LABEL_NAMES)
      if name not in self._metrics:
        # Built without the run's logical-axis rules: the feature networks' params are
        # replicated, and a rule would try to shard e.g. Inception's 3-channel input kernel.
        with nn.logical_axis_rules(()):
          self._metrics[name] = self._build(entry, data_config, pipeline.tokenizer)
      setting = caption_eval.Setting(
        sampler=entry.sampler, steps=entry.steps, cfg=entry.cfg, seed=entry.seed,
        resolution=pipeline.resolution, batch_size=entry.batch_size,
      )  # fmt: skip
      result = caption_eval.evaluate_images(
        pipeline, params, data_config, self._metrics[name], num_images=entry.num,
        out_dir=self.workdir / "eval" / name / f"{step:08d}", setting=setting, mesh=self.mesh,
        rules=self.rules,
      )  # fmt: skip
      scalars = {
        f"eval/{name}/{key}": value for key, value in result.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
      }  # fmt: skip
      writer.write_scalars(step, scalars)
      logging.info("eval %s at step %d: %s", name, step, scalars)

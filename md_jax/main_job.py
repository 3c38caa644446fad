"""The main job: every MobileDiffusion stage in order, each in its own directory of one workdir.

    python -m md_jax.main --config=configs/main.py --workdir=workdirs/main

`config.stages` holds one complete stage config per stage and `config.order` the order they run
in. A string value containing `{workdir}` is filled in with the main workdir, which is how a stage
names the checkpoint of one before it (`decoder_distill.init_checkpoint = "{workdir}/vae"`).
Each stage runs in `<workdir>/<name>` through the shared trainer, so it resumes by itself; a stage
whose final checkpoint already exists is skipped, so rerunning the command after an interruption
goes straight back to the stage that was running. The trainer prints a progress line with an ETA
every `report_every_secs`; this module prints one line as each stage starts and ends, and keeps
the wall time of each in `<workdir>/stage_times.json` (summed over interruptions).

At the end: a sample grid from the diffusion model (`<workdir>/samples/`) and the `shapes`
evaluator's figures for each `config.evaluations` entry whose stage is in `config.order`
(`<workdir>/eval.json`), which `md_jax.main` prints as the job's JSON line.
"""

import json
import os
import time

import ml_collections
from absl import logging
from etils import epath


def is_remote(path) -> bool:
  """A `gs://` (or other `scheme://`) path, which `pathlib` and `os.path` would fold to `gs:/...`
  on local disk."""
  return "://" in str(path)


def workdir_path(workdir, *, absolute: bool = True) -> epath.Path:
  """`workdir` as an `epath.Path` that keeps `gs://`; a local one made absolute unless `absolute`
  is False (as `checkpoints._absolute` does). An unknown `scheme://` is a ValueError."""
  text = str(workdir)
  if not is_remote(text):
    return epath.Path(os.path.abspath(text) if absolute else text)
  try:
    return epath.Path(text)
  except KeyError:  # epath knows a scheme only by its registered prefixes
    raise ValueError(
      f"--workdir={text!r}: unsupported scheme (local paths, gs://, s3://, az://, hf:// are)"
    ) from None


def resolve_workdir(stage_config: ml_collections.ConfigDict, workdir):
  """A copy of `stage_config` with every `{workdir}` in its string values replaced (`workdir` a
  str or a path; a `gs://` one is kept as it is)."""
  resolved = stage_config.copy_and_resolve_references()

  def fill(node):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        fill(value)
      elif isinstance(value, str) and "{workdir}" in value:
        node[key] = value.replace("{workdir}", str(workdir))

  fill(resolved)
  return resolved


def _say(message: str) -> None:
  # The job's own narrative goes to stdout, beside the trainer's log lines on stderr.
  print(f"[main] {message}", flush=True)


class _StageTimes:
  """Wall seconds per stage, kept in a JSON file so a resumed job adds to what it had."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.seconds = json.loads(path.read_text()) if path.exists() else {}

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds
    self.path.write_text(json.dumps(self.seconds, indent=1) + "\n")


def run(config, workdir: str) -> dict:
  """Runs every stage not yet finished, then samples and evaluates; returns the summary."""
  import jax

  from md_jax import config_utils
  from md_jax.infra import checkpoints, phases
  from md_jax.stages import run_stage

  workdir = workdir_path(workdir)  # `gs://...` kept: a pod's hosts share the one bucket
  unknown = [name for name in config.order if name not in config.stages]
  if unknown:
    raise ValueError(f"config.order names {unknown}, which config.stages does not define")
  times = _StageTimes(workdir / "stage_times.json")
  job_start = time.perf_counter()
  for index, name in enumerate(config.order, start=1):
    stage_config = resolve_workdir(config.stages[name], workdir)
    stage_dir = workdir / name
    target = phases.final_step(stage_config)
    done = checkpoints.completed_step(stage_dir)
    prefix = f"{index}/{len(config.order)} {name}"
    if done is not None and done >= target:
      _say(f"{prefix}: finished earlier (step {done} of {target}), skipped")
      continue
    start_note = "starting" if done is None else f"resuming from step {done}"
    _say(f"{prefix}: {start_note}, to step {target}, in {stage_dir}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # an earlier, different one is kept as config.<N>.json
      config_utils.record_config(stage_config, stage_dir)
    start = time.perf_counter()
    logging.info("Main job: stage %s", name)
    run_stage(stage_config, str(stage_dir))
    times.add(name, time.perf_counter() - start)
    finished = checkpoints.completed_step(stage_dir)
    if finished is None or finished < target:  # SIGTERM: the stage saved and stopped early
      _say(f"{prefix}: stopped at step {finished}; rerun the command to resume")
      return {"stopped_in": name, "step": finished}
    _say(f"{prefix}: done in {times.seconds[name] / 60:.1f} min")

  summary = {"stage_minutes": {k: round(v / 60, 2) for k, v in times.seconds.items()}}
  grid = _write_samples(config, workdir)
  summary["samples"] = str(grid) if grid else None
  summary["evaluations"] = _evaluate(config, workdir)
  summary["evaluations"].update(_evaluate_artifacts(config, workdir))
  summary["applications"] = _evaluate_applications(config, workdir)
  summary["job_minutes_this_run"] = round((time.perf_counter() - job_start) / 60, 2)
  (workdir / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
  return summary


def _write_samples(config, workdir: epath.Path) -> epath.Path | None:
  """The sample grid's path, or None when the stage it samples is not in this job's order (a job
  run for some stages only), as the evaluations below skip theirs."""
  from md_jax import generate

  sampling = config.samples
  if sampling.checkpoint not in config.order:
    _say(f"samples: skipped, stage {sampling.checkpoint!r} is not in config.order")
    return None
  guide = sampling.get("latent_classifier")  # classifier guidance, when that stage ran
  guided = bool(guide) and guide in config.order
  images, settings = generate.generate(
    str(workdir / sampling.checkpoint), list(sampling.prompts), sampler=sampling.sampler,
    steps=sampling.steps, cfg=sampling.cfg, seed=config.seed,
    latent_classifier=str(workdir / guide) if guided else None,
    classifier_scale=sampling.classifier_scale if guided else 0.0,
  )  # fmt: skip
  out = workdir / "samples"
  generate.write_images(images, list(sampling.prompts), settings, out)
  _say(f"wrote {len(images)} samples and grid.png to {out}")
  return out / "grid.png"


def _evaluate(config, workdir: epath.Path) -> dict:
  from md_jax.evaluation import shapes_eval

  results = {}
  for name, settings in config.evaluations.items():
    guide = settings.get("latent_classifier")  # classifier guidance by that stage's classifier
    missing = [s for s in (settings.checkpoint, guide) if s and s not in config.order]
    if missing:  # e.g. a job run with `ufogen` left out
      _say(f"{name}: skipped, stage {missing[0]!r} is not in config.order")
      continue
    start = time.perf_counter()
    result = shapes_eval.evaluate(
      str(workdir / settings.checkpoint), str(workdir / config.evaluator),
      sampler=settings.sampler, steps=settings.steps, cfg=settings.cfg,
      num_images=config.eval_images, seed=config.seed,
      latent_classifier=str(workdir / guide) if guide else None,
      classifier_scale=settings.get("classifier_scale", 0.0),
    )  # fmt: skip
    results[name] = result
    guided = f", classifier guidance {settings.classifier_scale}" if guide else ""
    _say(
      f"{name} ({settings.sampler}, {settings.steps} steps, cfg {settings.cfg}{guided}): "
      f"attribute accuracy {result['overall_accuracy']:.3f} (real images "
      f"{result['real_overall_accuracy']:.3f}), Fréchet distance "
      f"{result['frechet_distance']:.3f}, {time.perf_counter() - start:.0f} s"
    )
  return results


def _evaluate_artifacts(config, workdir: epath.Path) -> dict:
  """The one-step model as the phone gets it: exported (the fused one-step program, batch 1) into
  `workdir/export` and each artifact scored by the evaluator exactly as the JAX model is (same
  captions, same noise), as rows `<checkpoint>_<format>` beside the JAX row (issue 47). An export
  of the same checkpoint with these formats is reused."""
  settings = config.get("artifact_evaluation")
  if not settings or not settings.formats:
    return {}
  if settings.checkpoint not in config.order:
    _say(f"artifacts: skipped, stage {settings.checkpoint!r} is not in config.order")
    return {}
  from md_jax.evaluation import shapes_eval
  from md_jax.export import bundle, manifest, programs

  checkpoint, out = str(workdir / settings.checkpoint), workdir / "export"
  source = programs.source_from_checkpoint(checkpoint)
  formats = list(settings.formats)
  try:
    existing = manifest.read(out)
  except (FileNotFoundError, ValueError):
    existing = None
  entry = _one_step_entry(existing)
  reusable = entry and existing["source"] == source.description
  if not (reusable and set(formats) <= set(entry["files"])):
    start = time.perf_counter()
    bundle.export_all(source, str(out), kinds=("one_step",), batches=(1,), formats=formats)
    seconds = time.perf_counter() - start
    _say(f"exported the one-step program ({', '.join(formats)}) in {seconds:.0f} s")
    entry = _one_step_entry(manifest.read(out))
  results = {}
  for name in formats:
    start = time.perf_counter()
    result = shapes_eval.evaluate(
      checkpoint, str(workdir / config.evaluator), sampler="ufogen", steps=1, cfg=1.0,
      num_images=config.eval_images, seed=config.seed, artifact=str(out / entry["files"][name]),
    )  # fmt: skip
    results[f"{settings.checkpoint}_{name}"] = result
    _say(
      f"{settings.checkpoint} as {name}: attribute accuracy {result['overall_accuracy']:.3f}, "
      f"Fréchet distance {result['frechet_distance']:.3f}, {time.perf_counter() - start:.0f} s"
    )
  return results


def _evaluate_applications(config, workdir: epath.Path) -> dict:
  """The control plugin, the LoRA and inpainting with the teacher and the one-step generator
  (`evaluation/applications.py`), and their grid `<workdir>/applications.png`."""
  settings = config.get("applications")
  if not settings:
    return {}
  needed = (settings.teacher.checkpoint, settings.one_step.checkpoint, config.evaluator)
  missing = [name for name in needed if name not in config.order]
  if missing:
    _say(f"applications: skipped, stage {missing[0]!r} is not in config.order")
    return {}
  from md_jax.evaluation import applications

  lora = settings.get("lora")
  lora_path = None
  if lora and lora in config.order:
    lora_path = resolve_workdir(config.stages[lora], workdir).lora.export
  start = time.perf_counter()
  result = applications.evaluate(
    settings, workdir, workdir / config.evaluator, stages=tuple(config.order),
    lora_path=lora_path, grid=workdir / "applications.png", seed=config.seed,
  )  # fmt: skip
  if "control" in result:
    c = result["control"]
    _say(
      f"control: edge F1 {c['teacher']['edge_f1']:.3f} → {c['teacher_plugin']['edge_f1']:.3f} "
      f"(teacher), {c['one_step']['edge_f1']:.3f} → {c['one_step_plugin']['edge_f1']:.3f} "
      "(one step) with the plugin"
    )
  if "lora" in result:
    r = result["lora"]
    _say(
      f"lora: concept {r['kind']!r} drawn in one step for {r['concept_rate_with']:.3f} with, "
      f"{r['concept_rate_without']:.3f} without; accuracy drop {r['accuracy_drop']:.3f}"
    )
  if "inpainting" in result:
    i = result["inpainting"]
    routes = [k for k in ("training_free", "trained") if k in i]
    _say("inpainting (one step): " + "; ".join(
      f"{k} shape right {i[k]['object_right']:.3f}, kept PSNR {i[k]['kept_psnr_median']:.1f} dB"
      for k in routes
    ) + f", {time.perf_counter() - start:.0f} s")  # fmt: skip
  return result


def _one_step_entry(export_manifest) -> dict | None:
  if not export_manifest:
    return None
  return next((a for a in export_manifest["artifacts"] if a["name"] == "one_step_b1"), None)

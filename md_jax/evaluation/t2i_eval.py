r"""Text-to-image evaluation as the paper reports it: FID and CLIP score on held-out captions
(MobileDiffusion Sec. 5.1: zero-shot FID-30K on COCO 2014 validation captions, CLIP score with
OpenCLIP ViT-g/14, and the FID-vs-CLIP curve over guidance scales), sharded over every device and
process, resumable.

  python -m md_jax.evaluation.t2i_eval --workdir=RUN --dataset=coco_captions/2014 \
      --caption_key=captions/text --num=30000 --sampler=ufogen --steps=1 \
      --fid_weights=/data/fid_inception.safetensors --clip=/data/CLIP-ViT-g-14 \
      [--cfg_sweep=1.5,2,3,4,6] [--distributed ...]

One caption per image, the split read in order (the caption of a multi-caption example fixed by
the pipeline's seed), the same noise for an image whatever the device or process count. Each
global batch's per-image rows (features, CLIP cosines) are saved as one chunk under `--out`
(default `RUN/eval/<setting>`): a preempted evaluation, rerun with the same flags, resumes after
its last complete chunk and gives the figures an uninterrupted one gives. The real images'
Inception statistics are cached per dataset, split, resolution, count and network in
`--reference_dir`. Writes `result.json` (and for a sweep `sweep.json` + `sweep.png`); the last
line printed is that JSON.

Without weights (`shapes`, tests) `--fid_weights=random` and `--clip=random` run the same code
with randomly initialised networks: the figures then compare runs of this codebase only.
`--fid_network=shapes_classifier` uses the shapes classifier's features instead of Inception
(and adds its attribute accuracy), reproducing `shapes_eval`'s Fréchet distance.
"""

import dataclasses
import json
import os
import sys

import jax
from absl import app, flags, logging
from etils import epath

from md_jax.evaluation.caption_eval import Setting, check_settings, evaluate_images, replicate
from md_jax.evaluation.feature_networks import build_metrics

FLAGS = flags.FLAGS


def evaluate(
  workdir, *, setting: Setting, num_images=30000, dataset=None, data_dir=None, split="validation",
  caption_key=None, fid_network="inception", fid_weights="random", classifier=None, clip="",
  out=None, reference_dir=None,
) -> dict:  # fmt: skip
  """One evaluation of the diffusion-family run `workdir` (see the module docstring)."""
  from md_jax.infra import sharding
  from md_jax.pipeline.text_to_image import TextToImage

  pipeline, params, step, config = TextToImage.from_checkpoint(workdir, what="--workdir")
  resolution = setting.resolution or pipeline.resolution
  setting = dataclasses.replace(setting, resolution=resolution)
  data_config = config.data.copy_and_resolve_references()
  data_config.dataset = dataset or data_config.dataset
  data_config.data_dir = data_dir if data_dir is not None else data_config.get("data_dir", "")
  data_config.split = split
  data_config.resolution = resolution
  if caption_key:
    data_config.caption_key = caption_key
  out = epath.Path(out or epath.Path(workdir) / "eval" / f"{setting.name}_n{num_images}")
  check_settings(out, setting, num_images, data_config)  # before loading any network
  mesh = sharding.create_mesh((-1, 1))  # data-parallel over every device of every process
  rules = sharding.logical_axis_rules(None)
  metrics = build_metrics(
    data_config, pipeline.tokenizer, mesh, num_images=num_images, fid_network=fid_network,
    fid_weights=fid_weights, classifier=classifier, clip=clip, reference_dir=reference_dir,
  )  # fmt: skip
  result = evaluate_images(
    pipeline, replicate(params, mesh), data_config, metrics, out_dir=out, num_images=num_images,
    setting=setting, mesh=mesh, rules=rules,
  )  # fmt: skip
  result = {
    "workdir": str(workdir), "checkpoint_step": int(step), **dataclasses.asdict(setting),
    "dataset": data_config.dataset, "split": split, **result,
  }  # fmt: skip
  if jax.process_index() == 0:
    (out / "result.json").write_text(json.dumps(result, indent=1))
  return result


def plot_sweep(results, path) -> None:
  """FID against CLIP score, one point per guidance scale (the paper's trade-off curve)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(5, 4), dpi=120)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  clip = [r["clip_score"] for r in results]
  fid_values = [r["frechet_distance"] for r in results]
  axes.plot(clip, fid_values, "o-")
  for r, x, y in zip(results, clip, fid_values):
    axes.annotate(f"cfg {r['cfg']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
  axes.set_xlabel("CLIP score (100·cos)")
  axes.set_ylabel(f"FID ({results[0]['num_images']} images)")
  axes.grid(alpha=0.3)
  figure.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    figure.savefig(f, format="png")


def define_flags():
  """Defined only when this module runs as a program (importing it defines no flag)."""
  flags.DEFINE_string("workdir", None, "A diffusion-family run (or checkpoint).")
  flags.DEFINE_string("dataset", None, "TFDS name of the captions (default: the run's dataset).")
  flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's).")
  flags.DEFINE_string("split", "validation", "Split whose captions and images are used.")
  flags.DEFINE_string("caption_key", None, "Caption feature, e.g. captions/text for COCO.")
  flags.DEFINE_integer("num", 30000, "Images to generate, one per caption.")
  flags.DEFINE_integer("batch_size", 32, "Global images per generation batch (one chunk).")
  flags.DEFINE_enum("sampler", "ddim", ["ddim", "dpm++", "ufogen"], "Sampler.")
  flags.DEFINE_integer("steps", 50, "Network evaluations per image.")
  flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale (ddim, dpm++).")
  flags.DEFINE_list("cfg_sweep", [], "Guidance scales to sweep (FID-vs-CLIP curve), e.g. 1.5,2,3.")
  flags.DEFINE_float("eta", 0.0, "DDIM's fresh-noise share.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
  flags.DEFINE_integer("resolution", None, "Generation resolution (default: the run's).")
  flags.DEFINE_enum(
    "fid_network", "inception", ["inception", "shapes_classifier"], "FID feature network."
  )
  flags.DEFINE_string(
    "fid_weights", "random", "FID InceptionV3 safetensors (md_jax.tools.convert_inception)."
  )
  flags.DEFINE_string("classifier", None, "shapes_classifier run (default: beside --workdir).")
  flags.DEFINE_string("clip", "", "Local HF CLIPModel directory, 'random', or '' for none.")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval/<setting>).")
  flags.DEFINE_string("reference_dir", None, "Cache of real-image statistics.")
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() first (multi-process).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (not on TPU).")
  flags.DEFINE_integer("num_processes", None, "Process count (auto on TPU).")
  flags.DEFINE_integer("process_id", None, "This process's index (auto on TPU).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if FLAGS.distributed:
    from md_jax.infra import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  classifier = FLAGS.classifier or str(epath.Path(FLAGS.workdir).parent / "shapes_classifier")
  scales = [float(c) for c in FLAGS.cfg_sweep] or [FLAGS.cfg]
  results = []
  try:
    for cfg in scales:
      setting = Setting(
        sampler=FLAGS.sampler, steps=FLAGS.steps, cfg=cfg, eta=FLAGS.eta, seed=FLAGS.seed,
        resolution=FLAGS.resolution, batch_size=FLAGS.batch_size,
      )  # fmt: skip
      out = FLAGS.out and (epath.Path(FLAGS.out) / setting.name if FLAGS.cfg_sweep else FLAGS.out)
      results.append(
        evaluate(
          FLAGS.workdir,
          setting=setting,
          num_images=FLAGS.num,
          dataset=FLAGS.dataset,
          data_dir=FLAGS.data_dir,
          split=FLAGS.split,
          caption_key=FLAGS.caption_key,
          fid_network=FLAGS.fid_network,
          fid_weights=FLAGS.fid_weights,
          classifier=classifier,
          clip=FLAGS.clip,
          out=out,
          reference_dir=FLAGS.reference_dir,
        )
      )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  if FLAGS.cfg_sweep and jax.process_index() == 0:
    where = epath.Path(FLAGS.out or epath.Path(FLAGS.workdir) / "eval") / "sweep"
    where.mkdir(parents=True, exist_ok=True)
    (where / "sweep.json").write_text(json.dumps(results, indent=1))
    if "clip_score" in results[0]:
      plot_sweep(results, where / "sweep.png")
    logging.info("Wrote %s", where)
  for r in results:
    clip = (
      f", CLIP score {r['clip_score']:.2f} (cos {r['clip_cosine']:.4f})"
      if "clip_score" in r
      else ""
    )
    print(
      f"cfg {r['cfg']:g}: FID {r['frechet_distance']:.3f}{clip}, {r['images_per_s']:.2f} images/s"
    )
  print(json.dumps(results if FLAGS.cfg_sweep else results[0]))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

r"""Scores a text-to-image run on held-out `shapes` captions with the attribute classifier.

  python -m md_jax.evaluation.shapes_eval --workdir=DIFFUSION_RUN [--classifier=CLASSIFIER_RUN] \
      [--steps=50] [--sampler=ddim|dpm++|ufogen] [--cfg=3.0] [--eta=0] [--num_images=512] [--json] \
      [--latent_classifier=RUN --classifier_scale=S] [--artifact=EXPORT_DIR/one_step_b1/fp32.tflite]

For each validation caption it generates one image and prints
  (a) per-attribute accuracy of the generated images against the attributes their captions name
      (`kind_0` … `background`; a one-shape caption's second-shape attributes are "none"), their
      mean ("overall") and the share of images with every attribute right;
  (b) the Fréchet distance between the classifier's features of generated and real validation
      images (an FID with our classifier standing in for Inception);
  (c) generation throughput in images/s (compilation excluded),
and the classifier's accuracy on the real images beside them, the ceiling for (a).
`--classifier` defaults to the `shapes_classifier` run beside the workdir (the main job's layout).
`--latent_classifier` adds classifier guidance (a `latent_classifier` run) toward each caption's
attributes; the scoring classifier is a different network, trained on pixels.
`--artifact` scores an exported one-step pipeline (`md_jax.export --programs=one_step`: a LiteRT
`.tflite` or host `.vmfb`) in its runtime instead of the JAX model, with the same captions and
noise (`artifact_pipeline.py`); `--workdir` still provides the tokenizer and data config, and the
result names the artifact and its format. It takes `--sampler=ufogen --steps=1`, in one process.

It is `md_jax.evaluation.t2i_eval --fid_network=shapes_classifier` with the main job's settings:
the same loop (`caption_eval`), sharded and resumable, with the shapes metrics as its features.
"""

import contextlib
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """The Fréchet distance between two feature sets (N, D), as the evaluators compute it."""
  from md_jax.evaluation import fid

  stats = lambda x: fid.FeatureStats(x.shape[1]).update(x)
  return fid.fid_from_stats(stats(np.asarray(a)), stats(np.asarray(b)))


def evaluate(
  workdir,
  classifier,
  *,
  sampler="ddim",
  steps=50,
  cfg=3.0,
  eta=0.0,
  num_images=512,
  batch_size=32,
  seed=0,
  guide=None,
  latent_classifier=None,
  classifier_scale=0.0,
  out=None,
  artifact=None,
  loras=(),
  dtype=None,
) -> dict:
  """The figures above for `workdir`, through the evaluation loop every evaluator shares
  (`caption_eval.evaluate_images`) with the shapes classifier as its feature network. `out`
  keeps the per-image rows (a rerun resumes there); by default they go to a temporary
  directory, removed after. `artifact`: an exported one-step pipeline's file, run in its runtime
  in place of `workdir`'s JAX model (`ArtifactPipeline`). `loras`: [(LoRA file, scale), ...]
  merged into the UNet, their tokens' rows set (`pipeline/lora_file.apply_to`, as `generate
  --lora`). `dtype`: the UNet and text encoder compute in it, weights cast (as `generate
  --dtype`)."""

  from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels
  from md_jax.evaluation import caption_eval, feature_networks, metrics
  from md_jax.infra import sharding
  from md_jax.pipeline.classifier_guidance import load_guide
  from md_jax.pipeline.text_to_image import TextToImage

  pipeline, params, step, config = TextToImage.from_checkpoint(
    workdir, what="--workdir", dtype=dtype
  )
  if loras:
    from md_jax.pipeline import lora_file

    params = lora_file.apply_to(params, loras)
  if dtype is not None:
    params = pipeline.weights_in_compute_dtype(params)
  if artifact:  # before the mesh and the classifier: a wrong artifact or setting fails at once
    from md_jax.evaluation.artifact_pipeline import ArtifactPipeline

    pipeline = ArtifactPipeline.load(artifact, pipeline)
    pipeline.check(sampler=sampler, steps=steps, eta=eta, guided=bool(guide or latent_classifier))
  mesh = sharding.create_mesh((-1, 1))  # data-parallel over every device
  params = caption_eval.replicate(params, mesh)  # on the devices once, not with every batch
  guide_params = None
  if guide:  # a weaker model of the same architecture: autoguidance instead of CFG
    guide_params = caption_eval.replicate(
      TextToImage.from_checkpoint(guide, what="--guide")[1], mesh
    )
  classifier_guide = load_guide(latent_classifier, pipeline, scale=classifier_scale)
  batch_guide = None
  if classifier_guide is not None:  # toward the labels in the classifier's canonical order
    batch_guide = lambda batch: classifier_guide.with_labels(
      canonical_labels({key: np.asarray(batch[key]) for key in LABEL_NAMES})
    )
  features, classify, cls_config = feature_networks.shapes_classifier_features(classifier, mesh)
  resolution = cls_config.data.resolution
  data_config = config.data.copy_and_resolve_references()
  data_config.split = "validation"
  data_config.resolution = resolution
  data_config.label_keys = tuple(LABEL_NAMES)
  setting = caption_eval.Setting(
    sampler=sampler, steps=steps, cfg=cfg, eta=eta, seed=seed, resolution=resolution,
    batch_size=batch_size,
  )  # fmt: skip
  with contextlib.ExitStack() as stack:
    if out is None:
      out = stack.enter_context(tempfile.TemporaryDirectory(prefix="shapes_eval_"))
    check_artifact_out(out, artifact)
    result = caption_eval.evaluate_images(
      pipeline, params, data_config,
      [metrics.ShapesAttributes(classify), metrics.FrechetDistance(features)],
      out_dir=out, num_images=num_images, setting=setting, mesh=mesh,
      rules=sharding.logical_axis_rules(None), guide=guide_params, batch_guide=batch_guide,
    )  # fmt: skip
  named = {}
  if artifact:
    named = {
      "artifact": str(artifact),
      "format": pipeline.format,
      "artifact_source": pipeline.source,
    }
  return {
    **named,
    "checkpoint_step": int(step),
    "sampler": sampler,
    "steps": steps,
    "cfg": cfg,
    "eta": eta,
    "guide": guide,
    "latent_classifier": latent_classifier if classifier_guide is not None else None,
    "classifier_scale": float(classifier_scale) if classifier_guide is not None else 0.0,
    "num_images": result["num_images"],
    "overall_accuracy": result["overall_accuracy"],
    "all_attributes_correct": result["all_attributes_correct"],
    "accuracy": result["accuracy"],
    "kind_accuracy_by_size": result["kind_accuracy_by_size"],
    "real_overall_accuracy": result["real_overall_accuracy"],
    "frechet_distance": result["frechet_distance"],
    "images_per_s": result["images_per_s"],
  }


def check_artifact_out(out, artifact) -> None:
  """The rows in `out` are one model's: the loop's settings do not name the artifact, so
  `ARTIFACT.json` does, and resuming them with another model (or the JAX one) stops here."""
  path = pathlib.Path(out) / "ARTIFACT.json"
  found = json.loads(path.read_text())["artifact"] if path.exists() else None
  wanted = str(pathlib.Path(artifact).resolve()) if artifact else None
  if found == wanted:
    return
  if found is None and not (pathlib.Path(out) / "settings.json").exists():  # a fresh --out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"artifact": wanted}))
    return
  raise ValueError(
    f"--out={out} holds the rows of {found or 'the JAX model'}, not of "
    f"{wanted or 'the JAX model'}: pass another --out or delete it"
  )


def define_flags():
  """The command-line flags; defined only when this module runs as a program, so that importing
  it as a library next to another CLI module cannot collide on a flag name."""
  flags.DEFINE_string("workdir", None, "A diffusion-family run (or checkpoint).")
  flags.DEFINE_string("classifier", None, "A shapes_classifier run.")
  flags.DEFINE_enum("sampler", "ddim", ["ddim", "dpm++", "ufogen"], "Sampler.")
  flags.DEFINE_integer("steps", 50, "Network evaluations per image.")
  flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale (ddim, dpm++).")
  flags.DEFINE_float("eta", 0.0, "DDIM's fresh-noise share: 0 deterministic, 1 DDPM-like.")
  flags.DEFINE_integer("num_images", 512, "Validation captions to generate.")
  flags.DEFINE_integer("batch_size", 32, "Images per generation batch.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
  flags.DEFINE_string(
    "guide",
    None,
    "A weaker checkpoint of the same model (e.g. an earlier step of the run): "
    "autoguidance at scale --cfg instead of classifier-free guidance.",
  )
  flags.DEFINE_string(
    "latent_classifier",
    None,
    "A latent_classifier run: classifier guidance at --classifier_scale toward each caption's "
    "attributes (ddim, dpm++).",
  )
  flags.DEFINE_float("classifier_scale", 0.0, "Classifier guidance scale (0: none).")
  flags.DEFINE_string(
    "artifact",
    None,
    "An exported one-step pipeline (EXPORT_DIR/one_step_b1/fp32.tflite, fp16, int8 or host.vmfb): "
    "scored in its runtime instead of --workdir's JAX model (--sampler=ufogen --steps=1).",
  )
  flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "The UNet's and text encoder's dtype (as generate's)."
  )
  flags.DEFINE_bool("json", False, "Print only the JSON object.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  classifier = FLAGS.classifier or str(pathlib.Path(FLAGS.workdir).parent / "shapes_classifier")
  try:
    result = evaluate(
      FLAGS.workdir, classifier, sampler=FLAGS.sampler, steps=FLAGS.steps, cfg=FLAGS.cfg,
      eta=FLAGS.eta, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
      guide=FLAGS.guide, latent_classifier=FLAGS.latent_classifier,
      classifier_scale=FLAGS.classifier_scale, artifact=FLAGS.artifact, dtype=FLAGS.dtype,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  if not FLAGS.json:
    if FLAGS.artifact:
      print(f"{result['artifact']} ({result['format']}):")
    print(f"{result['sampler']} × {result['steps']} steps, cfg {result['cfg']}, "
          f"eta {result['eta']}, {result['num_images']} held-out captions:")  # fmt: skip
    for key, value in result["accuracy"].items():
      print(f"  {key:12s} {value:.3f}")
    for size, value in result["kind_accuracy_by_size"].items():
      print(f"  kind, {size:5s} {value:.3f}")
    print(f"  overall      {result['overall_accuracy']:.3f} "
          f"(real images: {result['real_overall_accuracy']:.3f}); every attribute right: "
          f"{result['all_attributes_correct']:.3f}")  # fmt: skip
    print(f"  Fréchet distance (classifier features) {result['frechet_distance']:.3f}; "
          f"{result['images_per_s']:.2f} images/s")  # fmt: skip
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

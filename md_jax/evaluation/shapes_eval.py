r"""Scores a text-to-image run on held-out `shapes` captions with the attribute classifier.

  python -m md_jax.evaluation.shapes_eval --workdir=DIFFUSION_RUN [--classifier=CLASSIFIER_RUN] \
      [--steps=50] [--sampler=ddim|dpm++|ufogen] [--cfg=3.0] [--eta=0] [--num_images=512] [--json] \
      [--latent_classifier=RUN --classifier_scale=S]

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
"""

import functools
import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between two feature sets (N, D)."""
  import scipy.linalg

  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
  root = root.real  # round-off can leave a tiny imaginary part
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def kind_accuracy_by_size(kind_correct, size_ids) -> dict[str, float]:
  """Kind accuracy over the shapes of each captioned size (a one-shape scene's absent second shape,
  size id `len(SIZES)`, counts in neither). A shape's kind is its outline, a few latent pixels
  wide when small: this says whether a model draws outlines at all or only at the larger size.
  `kind_correct`, `size_ids`: one (N,) array per shape slot."""
  from md_jax.data.shapes_scene import SIZES

  by_size = {}
  for size_id, size in enumerate(SIZES):
    hits = np.concatenate([c[s == size_id] for c, s in zip(kind_correct, size_ids)])
    by_size[size] = float(np.mean(hits)) if hits.size else float("nan")
  return by_size


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
) -> dict:
  import jax

  from md_jax.data.pipeline import create_input_iterator
  from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels
  from md_jax.infra import checkpoints, sharding
  from md_jax.models.shapes_classifier import ShapesClassifier
  from md_jax.pipeline.classifier_guidance import load_guide
  from md_jax.pipeline.text_to_image import TextToImage

  cls_config, cls_tree, _ = checkpoints.open_checkpoint(classifier, "--classifier")
  cls_variables = jax.device_put({"params": cls_tree["classifier"]["ema_params"]})
  classify = jax.jit(ShapesClassifier.from_config(cls_config).apply)
  classify = functools.partial(classify, cls_variables)

  pipeline, params, step, config = TextToImage.from_checkpoint(workdir, what="--workdir")
  params = jax.device_put(params)  # on the device once, not with every batch's call
  guide_params = None
  if guide:  # a weaker model of the same architecture: autoguidance instead of CFG
    guide_params = jax.device_put(TextToImage.from_checkpoint(guide, what="--guide")[1])
  classifier_guide = load_guide(latent_classifier, pipeline, scale=classifier_scale)
  resolution = cls_config.data.resolution
  data_config = config.data.copy_and_resolve_references()
  data_config.split = "validation"
  data_config.resolution = resolution
  data_config.label_keys = tuple(LABEL_NAMES)
  mesh = sharding.create_mesh((-1, 1))  # data-parallel over every device
  iterator = create_input_iterator(
    data_config, global_batch_size=batch_size, mesh=mesh, rules=sharding.logical_axis_rules(None),
    train=False,
  )  # fmt: skip
  correct = {key: [] for key in LABEL_NAMES}
  real_correct = {key: [] for key in LABEL_NAMES}
  sizes = {"size_0": [], "size_1": []}  # the sizes captioned, to split kind accuracy by them
  generated_features, real_features = [], []
  generation_seconds, timed_images = 0.0, 0
  try:
    for i, batch in enumerate(iterator):
      if i * batch_size >= num_images:
        break
      # The classifier predicts, and so is scored on (and guides toward), the labels in
      # canonical shape order.
      labels = canonical_labels({key: np.asarray(batch[key]) for key in LABEL_NAMES})
      batch_guide = None
      if classifier_guide is not None:
        batch_guide = classifier_guide.with_labels(labels)
      start = time.perf_counter()
      images = pipeline.generate(
        params, batch["tokens"], seed=jax.random.fold_in(jax.random.key(seed), i),
        resolution=resolution, sampler=sampler, steps=steps, cfg=cfg, eta=eta, guide=guide_params,
        classifier_guide=batch_guide,
      ).block_until_ready()  # fmt: skip
      if i > 0:  # the first batch pays for compilation
        generation_seconds += time.perf_counter() - start
        timed_images += len(images)
      fake_logits, fake_features = classify(images.astype(np.float32) / 127.5 - 1.0)
      real_logits, real_feats = classify(batch["image"])
      for key in sizes:
        sizes[key].append(np.asarray(labels[key]))
      for key in LABEL_NAMES:
        correct[key].append(np.asarray(fake_logits[key]).argmax(-1) == np.asarray(labels[key]))
        real_correct[key].append(np.asarray(real_logits[key]).argmax(-1) == np.asarray(labels[key]))
      generated_features.append(np.asarray(fake_features))
      real_features.append(np.asarray(real_feats))
  finally:
    iterator.close()
  if not generated_features:
    raise ValueError(f"the validation split has fewer than --batch_size={batch_size} images")
  per_image = np.stack([np.concatenate(v) for v in correct.values()])  # (attributes, N)
  per_attribute = {key: float(np.mean(np.concatenate(v))) for key, v in correct.items()}
  real_per_attribute = {key: float(np.mean(np.concatenate(v))) for key, v in real_correct.items()}
  kind_by_size = kind_accuracy_by_size(
    [np.concatenate(correct[f"kind_{i}"]) for i in (0, 1)],
    [np.concatenate(sizes[f"size_{i}"]) for i in (0, 1)],
  )
  return {
    "checkpoint_step": int(step),
    "sampler": sampler,
    "steps": steps,
    "cfg": cfg,
    "eta": eta,
    "guide": guide,
    "latent_classifier": latent_classifier if classifier_guide is not None else None,
    "classifier_scale": float(classifier_scale) if classifier_guide is not None else 0.0,
    "num_images": int(per_image.shape[1]),
    "overall_accuracy": float(np.mean(list(per_attribute.values()))),
    "all_attributes_correct": float(np.mean(per_image.all(axis=0))),
    "accuracy": per_attribute,
    "kind_accuracy_by_size": kind_by_size,
    "real_overall_accuracy": float(np.mean(list(real_per_attribute.values()))),
    "frechet_distance": frechet_distance(
      np.concatenate(generated_features), np.concatenate(real_features)
    ),
    "images_per_s": timed_images / generation_seconds if timed_images else float("nan"),
  }


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
      classifier_scale=FLAGS.classifier_scale,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  if not FLAGS.json:
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

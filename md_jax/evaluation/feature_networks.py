"""The networks an evaluation scores with, built from flags or `config.evals` entries: the FID
InceptionV3 (or the shapes classifier's features), CLIP, and the metrics around them.
"""

import os

import jax
from absl import logging
from etils import epath

from md_jax.evaluation.caption_eval import replicate


class _Features:
  """A feature network applied with params replicated on the evaluation's mesh, and the name the
  reference cache is keyed by."""

  def __init__(self, apply, params, name: str):
    self._apply = jax.jit(apply)
    self.params = params
    self.name = name

  def __call__(self, images):
    return self._apply(self.params, images)


def _file_digest(path: str) -> str:
  import hashlib

  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while block := f.read(1 << 24):
      digest.update(block)
  return digest.hexdigest()[:12]


def inception_features(weights: str, mesh) -> _Features:
  """The FID InceptionV3 (pytorch-fid's weights converted by `md_jax.tools.convert_inception`)
  behind clean-fid's resize, or randomly initialised for `weights="random"` (figures comparable
  only between runs of md_jax)."""
  from md_jax.evaluation import fid
  from md_jax.models import inception

  if weights == "random":
    logging.warning("FID with a randomly initialised InceptionV3: compare only runs of md_jax")
    module, params = inception.InceptionV3(), inception.random_params(jax.random.key(0))
    name = "inception:random(key 0)"
  else:
    module, params = inception.load_inception(weights)
    name = f"inception:{_file_digest(weights)}"
  apply = lambda p, images: module.apply({"params": p}, fid.resize_clean(images))
  return _Features(apply, replicate(params, mesh), f"{name}, {fid.PROTOCOL}")


def shapes_classifier_features(run: str, mesh):
  """(features, classify) of a `shapes_classifier` run: its penultimate features for the Fréchet
  distance (images uint8), and its logits and features on [−1, 1] images for attribute accuracy."""
  import jax.numpy as jnp

  from md_jax.infra import checkpoints
  from md_jax.models.shapes_classifier import ShapesClassifier

  config, tree, step = checkpoints.open_checkpoint(run, "--classifier")
  params = replicate(tree["classifier"]["ema_params"], mesh)
  module = ShapesClassifier.from_config(config)
  apply = jax.jit(lambda p, images: module.apply({"params": p}, images))
  features = _Features(
    lambda p, images: module.apply({"params": p}, images.astype(jnp.float32) / 127.5 - 1.0)[1],
    params,
    f"shapes_classifier:{os.path.abspath(run)}@{step}",
  )
  return features, lambda images: apply(params, images), config


def clip_scorer(clip: str, tokenizer, mesh):
  """CLIP from a local Hugging Face `CLIPModel` directory, or `"random"`: a small randomly
  initialised CLIP over `tokenizer`'s vocabulary (figures comparable only between md_jax runs)."""
  from md_jax.evaluation import clip_score

  if clip == "random":
    logging.warning("CLIP score with a randomly initialised CLIP: compare only runs of md_jax")
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    scorer = clip_score.CLIPScorer.from_config({
      "projection_dim": 64,
      "text_config": {
        **tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
        "eos_token_id": tokenizer.eos_token_id,
      },
      "vision_config": {**tower, "image_size": 32, "patch_size": 8},
    })  # fmt: skip
    scorer.name = "clip:random(seed 0)"
  else:
    scorer = clip_score.CLIPScorer.from_pretrained(clip)
    scorer.name = f"clip:{clip}"
    vocab = scorer.model.text_model.vocab_size
    if vocab < len(tokenizer):
      raise ValueError(
        f"--clip={clip}: its text tower reads {vocab} token ids, the model's tokenizer writes "
        f"{len(tokenizer)}: a CLIP with the same BPE vocabulary is needed"
      )
  scorer.params = replicate(scorer.params, mesh)
  return scorer


def build_metrics(
  data_config, tokenizer, mesh, *, num_images, fid_network="inception", fid_weights="random",
  classifier=None, clip="", reference_dir=None,
) -> list:  # fmt: skip
  """The metrics of one evaluation of `data_config`'s split at `data_config.resolution`: FID with
  Inception (real statistics cached) or with the shapes classifier (and its attribute accuracy,
  `data_config.label_keys` set to read the labels), and CLIP score when `clip` is given."""
  from md_jax.evaluation import metrics as metrics_lib

  metrics = []
  if fid_network == "shapes_classifier":
    from md_jax.data.shapes_scene import LABEL_NAMES

    features, classify, _ = shapes_classifier_features(classifier, mesh)
    data_config.label_keys = tuple(LABEL_NAMES)
    metrics.append(metrics_lib.ShapesAttributes(classify))
    metrics.append(metrics_lib.FrechetDistance(features))
  elif fid_network == "inception":
    features = inception_features(fid_weights, mesh)
    reference = metrics_lib.ReferenceStats(
      reference_dir or _default_reference_dir(), dataset=data_config.dataset,
      split=data_config.split, resolution=data_config.resolution, num_images=num_images,
      caption_key=data_config.get("caption_key", "caption"), features=features.name,
    )  # fmt: skip
    metrics.append(metrics_lib.FrechetDistance(features, reference))
  else:
    raise ValueError(f"fid_network={fid_network!r}: expected 'inception' or 'shapes_classifier'")
  if clip:
    metrics.append(metrics_lib.CLIPScore(clip_scorer(clip, tokenizer, mesh)))
  return metrics


def _default_reference_dir() -> str:
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(cache, "md_jax", "fid_reference")

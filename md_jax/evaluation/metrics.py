"""What a text-to-image evaluation measures, one metric per class, over the images it generates.

Each metric maps a batch of generated images (uint8, a global array sharded over the batch) and
the input batch they were generated for to per-image arrays (`on_generated`; `on_real` for the
real images where it needs them). The evaluator gathers those rows, saves them a chunk at a time
(`chunks.py`) and, once every chunk is in, hands all rows to `summarize`. Keeping per-image rows
rather than running sums is what makes a resumed or multi-process evaluation reproduce an
uninterrupted one-process evaluation: the final figures are computed once, from the same rows.

  FrechetDistance   FID with any feature network: InceptionV3 (the paper's FID), or the shapes
                    classifier (`shapes`, where no Inception weights exist); the real images'
                    statistics cached per dataset, split, resolution, count and network
  CLIPScore         CLIP score between each image and its caption (paper Table 2)
  ShapesAttributes  the `shapes` captions' attributes read back by the shapes classifier
"""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from md_jax.evaluation import fid


class Metric:
  name: str

  @property
  def needs_real(self) -> bool:
    """Whether `on_real` must run on the real images of every batch."""
    return False

  def on_generated(self, images, batch) -> dict:
    raise NotImplementedError

  def on_real(self, batch) -> dict:
    del batch
    return {}

  def summarize(self, rows: dict[str, np.ndarray]) -> dict:
    raise NotImplementedError


def real_images_uint8(batch):
  """The input pipeline's real images ([−1, 1] float) back on the 0–255 grid they were read at."""
  return jnp.clip(jnp.round((batch["image"] + 1) * 127.5), 0, 255).astype(jnp.uint8)


class ReferenceStats:
  """The real images' feature statistics, computed once per (dataset, split, resolution, image
  count, feature network) and kept in `directory` as `<key>.npz`."""

  def __init__(self, directory, **key):
    self.key = key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = "_".join(str(key[k]) for k in ("dataset", "split", "resolution", "num_images"))
    self.path = epath.Path(directory) / f"{name.replace('/', '-')}_{digest}.npz"

  def load(self) -> fid.FeatureStats | None:
    return fid.FeatureStats.load(self.path) if self.path.exists() else None

  def save(self, stats: fid.FeatureStats) -> None:
    if jax.process_index() != 0:
      return
    stats.save(self.path)
    logging.info("Saved the reference statistics %s (%s)", self.path, self.key)


def _stats(features: np.ndarray) -> fid.FeatureStats:
  return fid.FeatureStats(features.shape[1]).update(features)


class FrechetDistance(Metric):
  """Fréchet distance between the feature statistics of generated and real images.

  `features`: an object with a `.name` (what the reference cache is keyed by) that maps uint8
  images (B, H, W, 3) to features (B, D). `reference`: a `ReferenceStats`, or None to compute
  the real images' statistics every time (the `shapes` evaluator, whose real set is small).
  """

  name = "fid"

  def __init__(self, features, reference: ReferenceStats | None = None):
    self.features = features
    self.reference = reference
    self._cached = reference.load() if reference is not None else None
    if self._cached is not None:
      logging.info("Reference statistics from %s", reference.path)

  @property
  def needs_real(self) -> bool:
    return self._cached is None

  def on_generated(self, images, batch) -> dict:
    return {"fid/generated": self.features(images)}

  def on_real(self, batch) -> dict:
    return {"fid/real": self.features(real_images_uint8(batch))}

  def summarize(self, rows) -> dict:
    generated = _stats(rows["fid/generated"])
    real = self._cached
    if real is None:
      real = _stats(rows["fid/real"])
      if self.reference is not None:
        self.reference.save(real)
        self._cached = real  # a periodic evaluation's next run reads no real images
    return {
      "frechet_distance": fid.fid_from_stats(generated, real),
      "fid_features": self.features.name,
      "fid_reference_images": int(real.count),
    }


class CLIPScore(Metric):
  """Cosine similarity of CLIP's image and text embeddings for each (image, caption) pair,
  reported both ways: 100·max(cos, 0) averaged (torchmetrics' CLIPScore, what most papers
  print) and the mean cosine, the 0–1 figure of the paper's Table 2."""

  name = "clip"

  def __init__(self, scorer):
    self.scorer = scorer

  def on_generated(self, images, batch) -> dict:
    return {"clip/cosine": self.scorer.score(images, batch["tokens"])}

  def summarize(self, rows) -> dict:
    cosine = rows["clip/cosine"].astype(np.float64)
    return {
      "clip_score": float(np.mean(100 * np.maximum(cosine, 0))),
      "clip_cosine": float(np.mean(cosine)),
      "clip_model": getattr(self.scorer, "name", type(self.scorer).__name__),
    }


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


class ShapesAttributes(Metric):
  """`shapes` attribute accuracy: the classifier's reading of each generated (and real) image
  against the attributes its caption names."""

  name = "shapes"

  def __init__(self, classify):
    self.classify = classify  # images in [−1, 1] → (logits per attribute, features)

  @property
  def needs_real(self) -> bool:
    return True  # the classifier's accuracy on real images: the ceiling the report states

  def _predictions(self, images, prefix):
    from md_jax.data.shapes_scene import LABEL_NAMES

    logits, _ = self.classify(images)
    return {f"shapes/{prefix}_{k}": jnp.argmax(logits[k], -1) for k in LABEL_NAMES}

  def on_generated(self, images, batch) -> dict:
    from md_jax.data.shapes_scene import LABEL_NAMES

    rows = self._predictions(images.astype(jnp.float32) / 127.5 - 1.0, "generated")
    rows.update({f"shapes/label_{k}": batch[k] for k in LABEL_NAMES})
    return rows

  def on_real(self, batch) -> dict:
    return self._predictions(batch["image"], "real")

  def summarize(self, rows) -> dict:
    from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels

    # The classifier predicts, and so is scored on, the labels in canonical shape order.
    labels = canonical_labels({k: rows[f"shapes/label_{k}"] for k in LABEL_NAMES})
    correct = {k: rows[f"shapes/generated_{k}"] == labels[k] for k in LABEL_NAMES}
    real_correct = {k: rows[f"shapes/real_{k}"] == labels[k] for k in LABEL_NAMES}
    per_attribute = {k: float(np.mean(v)) for k, v in correct.items()}
    per_image = np.stack(list(correct.values()))
    return {
      "overall_accuracy": float(np.mean(list(per_attribute.values()))),
      "all_attributes_correct": float(np.mean(per_image.all(axis=0))),
      "accuracy": per_attribute,
      "kind_accuracy_by_size": kind_accuracy_by_size(
        [correct[f"kind_{i}"] for i in (0, 1)], [labels[f"size_{i}"] for i in (0, 1)]
      ),
      "real_overall_accuracy": float(np.mean([np.mean(v) for v in real_correct.values()])),
    }

"""FID as clean-fid computes it: PIL-bicubic resize to 299 in float, pytorch-fid's InceptionV3
pool3 features, Gaussian statistics accumulated exactly in float64, the Fréchet distance.

Resize. clean-fid's "clean" mode resizes each channel as a float32 PIL image (mode "F") with
bicubic filtering to 299×299 and clips to [0, 255], without quantising back to uint8 — the
resize that other FID code gets wrong (aliasing, uint8 rounding) and that moves FID by whole
points. `jax.image.resize(..., "cubic", antialias=True)` is the same filter (Keys a = −0.5, widened
by the scale when shrinking, renormalised at the borders) but builds its weights in float32 from
float32 sample positions: 3-6e-3 max abs error on a 0-255 scale against PIL on noise images
(512, 256, 300×200 → 299). Here PIL's own coefficients (Pillow's `precompute_coeffs`) are built
on the host in float64 from the sizes alone and the resize runs on device as two matmuls, width
then height as PIL does: within ~1e-4 of PIL (tests/test_inception.py).

Statistics. `FeatureStats` keeps count, Σx and Σxxᵀ in float64, so chunks of an evaluation
(batches, preempted runs, processes) merge into exactly the statistics of the whole.
"""

import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from scipy import linalg

from md_jax.infra import files
from md_jax.models import inception

# Evaluators write this next to every FID so that numbers from different protocols never meet.
PROTOCOL = "clean-fid (PIL bicubic, float, 299) + pytorch-fid InceptionV3 pool3"
SIZE = inception.IMAGE_SIZE


def _bicubic(x: np.ndarray) -> np.ndarray:
  # Pillow's bicubic_filter: Keys' cubic with a = −0.5.
  a = -0.5
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.cache
def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of Pillow's resampling coefficients (Resample.c's
  `precompute_coeffs`, support 2 widened by the scale when shrinking, window renormalised)."""
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 2.0 * filterscale
  weights = np.zeros((out_size, in_size), np.float64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    # C's (int) truncates toward zero; the clamp makes the negative case moot.
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size)
    taps = _bicubic((np.arange(xmin, xmax) - center + 0.5) / filterscale)
    total = taps.sum()
    weights[xx, xmin:xmax] = taps / total if total != 0.0 else taps
  return weights


def resize_clean(images: jax.Array, size: int = SIZE) -> jax.Array:
  """(B, H, W, C) uint8 or float in [0, 255] → (B, size, size, C) float32, clean-fid's resize."""
  x = images.astype(jnp.float32)
  _, h, w, _ = x.shape
  if (h, w) != (size, size):  # PIL returns a same-size image untouched
    ww = jnp.asarray(pil_bicubic_weights(w, size), jnp.float32)
    wh = jnp.asarray(pil_bicubic_weights(h, size), jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # f32 passes on TPUs too: bf16 would miss PIL by ~1 level
    x = jnp.einsum("ow,bhwc->bhoc", ww, x, precision=hi)
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hi)
  return jnp.clip(x, 0.0, 255.0)


class InceptionFeatures:
  """Images of any size, uint8 or float in [0, 255], (B, H, W, 3) → pool3 features (B, 2048).

  One jitted program per input shape and dtype: resize_clean, then the FID InceptionV3.
  """

  def __init__(self, params, module: inception.InceptionV3 | None = None):
    self.module = module or inception.InceptionV3()
    self.params = jax.device_put(params)
    self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, resize_clean(x)))

  @classmethod
  def from_file(cls, path: str) -> "InceptionFeatures":
    module, params = inception.load_inception(path)
    return cls(params, module)

  def __call__(self, images) -> np.ndarray:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected (B, H, W, 3) images, got shape {images.shape}")
    return np.asarray(self._apply(self.params, images))


@dataclasses.dataclass
class FeatureStats:
  """Count, Σx and Σxxᵀ of feature vectors, float64: exact to merge across chunks and processes."""

  dim: int = inception.FEATURE_DIM
  count: int = 0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros((self.dim,), np.float64)
    if self.outer is None:
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features) -> "FeatureStats":
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"expected (N, {self.dim}) features, got shape {f.shape}")
    self.count += f.shape[0]
    self.total += f.sum(axis=0)
    self.outer += f.T @ f
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds `other`'s vectors into these statistics (in place; returns self)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge {other.dim}-d statistics into {self.dim}-d ones")
    self.count += other.count
    self.total += other.total
    self.outer += other.outer
    return self

  @property
  def mean(self) -> np.ndarray:
    if self.count < 1:
      raise ValueError("no feature vectors accumulated")
    return self.total / self.count

  @property
  def covariance(self) -> np.ndarray:
    """Unbiased (n − 1) covariance, np.cov(features, rowvar=False)."""
    if self.count < 2:
      raise ValueError(f"covariance needs at least 2 feature vectors, have {self.count}")
    mean = self.mean
    return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  def save(self, path) -> None:
    """As .npz, written whole (local or gs:// paths)."""
    buffer = io.BytesIO()  # a file object: np.savez would append ".npz" to a bare name
    np.savez(buffer, count=self.count, total=self.total, outer=self.outer)
    files.write_whole(path, buffer.getvalue())

  @classmethod
  def load(cls, path) -> "FeatureStats":
    with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
      total = data["total"].astype(np.float64)
      return cls(total.shape[0], int(data["count"]), total, data["outer"].astype(np.float64))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) in float64, as pytorch-fid's
  calculate_frechet_distance: an eps on the diagonals when the product's root is not finite
  (singular covariances: fewer samples than dimensions), tiny imaginary parts dropped."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
      f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
    )
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("FID: singular covariance product; adding %g to the diagonals", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)

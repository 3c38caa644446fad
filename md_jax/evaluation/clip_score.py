"""CLIP score as the MobileDiffusion paper reports it (Sec. 5.1: OpenCLIP ViT-g/14).

`CLIPScorer` embeds generated uint8 images and their prompts' token ids with a two-tower
`md_jax.models.clip_vision.CLIPModel` and returns the per-pair cosine, so an evaluator can sum it
across chunks and processes and divide once. Two conventions read that cosine:

- `paper_clip_score`: the raw cosine in [-1, 1]; the paper's Table 2 prints its mean (0.325 for
  MobileDiffusion 50 steps).
- `torchmetrics_clip_score`: `100 * max(cos, 0)`, torchmetrics' `CLIPScore` per pair (~32.5).

Real weights: a local copy of `laion/CLIP-ViT-g-14-laion2B-s12B-b42K` (see
`clip_weights.load_clip_model`); tokens from `md_jax.data.tokenizer` loaded from the same
directory, which carries the vocabulary the weights were trained with.

Preprocessing runs on device, in the same jitted program as the image tower: it reproduces HF
`CLIPImageProcessor` (shorter side resized to `image_size` with antialiased bicubic, rounded to
uint8 as the processor's uint8 resize does, centre crop, x / 255, OpenAI mean/std). Against the
PIL processor (`CLIPImageProcessorPil`, the reference torchvision's uint8 resize copies) on
512x512, 301x517, 1024x768 and 150x200 images, noise and smooth: at most one uint8 step (0.0150
normalised) on 0.004-0.08% of values, mean error <= 1.2e-5; against torch's uint8 resize (what
the torchvision-backed `CLIPImageProcessor` runs on CPU) one step on ~0.4%. The processors
disagree with each other by as much, so the host round trip would buy nothing.
"""

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md_jax.models import clip_weights
from md_jax.models.clip_vision import CLIPModel

# transformers.image_utils.OPENAI_CLIP_MEAN / _STD, which every CLIP checkpoint's processor uses
# (the LAION OpenCLIP models included).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """HF's `get_resize_output_image_size(default_to_square=False)`: the long side truncates."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(shortest_edge * long / short)
  return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """(B, H, W, 3) uint8 -> (B, image_size, image_size, 3) float32 normalised CLIP pixels."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 images (B, H, W, 3), got shape {images.shape}")
  _, h, w, c = images.shape
  new_h, new_w = resized_shape(h, w, image_size)
  x = images.astype(jnp.float32)
  # Keys cubic (a = -0.5) with the kernel widened when shrinking, renormalised at the borders:
  # PIL's antialiased bicubic, which torchvision's uint8 path copies. Both resample the width
  # first and store a uint8 image between the passes; without that intermediate rounding and
  # clamping, bicubic overshoot on sharp edges differs by up to 0.28 in normalised pixels.
  if new_w != w:
    x = jax.image.resize(x, (x.shape[0], h, new_w, c), "bicubic", antialias=True)
    x = jnp.clip(jnp.floor(x + 0.5), 0, 255)  # PIL rounds halves up.
  if new_h != h:
    x = jax.image.resize(x, (x.shape[0], new_h, new_w, c), "bicubic", antialias=True)
    x = jnp.clip(jnp.floor(x + 0.5), 0, 255)  # PIL rounds halves up.
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2  # HF: int((h - crop) / 2).
  x = x[:, top : top + image_size, left : left + image_size]
  mean, std = jnp.asarray(OPENAI_CLIP_MEAN), jnp.asarray(OPENAI_CLIP_STD)
  return (x / 255.0 - mean) / std


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def paper_clip_score(cosine) -> np.ndarray:
  """The paper's Table 2 convention: the raw cosine (its mean over pairs is reported)."""
  return np.asarray(cosine, np.float64)


def torchmetrics_clip_score(cosine) -> np.ndarray:
  """torchmetrics' `CLIPScore` per pair: 100 * max(cosine, 0)."""
  return 100.0 * np.maximum(np.asarray(cosine, np.float64), 0.0)


class CLIPScorer:
  """Per-pair CLIP cosine between uint8 NHWC images and (B, 77) int32 CLIP token ids.

  `matmul_precision` defaults to float32: on TPU the default bf16 passes move a cosine in its
  third digit, the one the paper compares; the metric is cheap next to generating the images.
  """

  def __init__(self, model: CLIPModel, params: Mapping, *, matmul_precision: str = "float32"):
    self.model, self.params, self.matmul_precision = model, params, matmul_precision
    size = model.vision_model.image_size
    apply = lambda method: lambda p, x: model.apply({"params": p}, x, method=method)
    image_features = apply(CLIPModel.image_features)
    text_features = apply(CLIPModel.text_features)
    self._preprocess = jax.jit(lambda images: preprocess(images, size))
    self._image = jax.jit(lambda p, images: image_features(p, preprocess(images, size)))
    self._text = jax.jit(text_features)
    self._score = jax.jit(
      lambda p, images, tokens: jnp.sum(
        _normalize(image_features(p, preprocess(images, size)))
        * _normalize(text_features(p, tokens)),
        axis=-1,
      )
    )

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "CLIPScorer":
    """From a local HF CLIPModel directory; `dtype`, `param_dtype`, `mesh`, `logical_axis_rules`
    go to `clip_weights.load_clip_model`, `matmul_precision` to the scorer."""
    precision = kwargs.pop("matmul_precision", "float32")
    model, params = clip_weights.load_clip_model(path, **kwargs)
    return cls(model, params, matmul_precision=precision)

  @classmethod
  def from_config(cls, config: Any, *, seed: int = 0, **overrides) -> "CLIPScorer":
    """Random weights for a CLIPModel config dict (tests, `shapes`, `clip_vision.VIT_G_14`)."""
    precision = overrides.pop("matmul_precision", "float32")
    model = CLIPModel.from_hf_config(config, **overrides)
    vision = model.vision_model
    pixels = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels))
    ids = jnp.zeros((1, model.text_model.max_length), jnp.int32)
    params = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, pixels, ids)["params"]))(
      jax.random.key(seed)
    )
    return cls(model, params, matmul_precision=precision)

  def _run(self, fn, *args):
    with jax.default_matmul_precision(self.matmul_precision):
      return fn(*args)

  def preprocess(self, images_uint8) -> jax.Array:
    """The image tower's input for these images (for inspection; the methods below include it)."""
    return self._run(self._preprocess, _check_images(images_uint8))

  def image_embeds(self, images_uint8) -> jax.Array:
    """(B, projection_dim) unnormalised, as HF `get_image_features` of the processed images."""
    return self._run(self._image, self.params, _check_images(images_uint8))

  def text_embeds(self, token_ids) -> jax.Array:
    """(B, projection_dim) unnormalised: the pooled EOS state through `text_projection`."""
    return self._run(self._text, self.params, self._check_tokens(token_ids))

  def score(self, images_uint8, token_ids) -> jax.Array:
    """(B,) float32 cosine of each image with its own prompt; sum across chunks, then divide."""
    images, tokens = _check_images(images_uint8), self._check_tokens(token_ids)
    if images.shape[0] != tokens.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} token rows")
    return self._run(self._score, self.params, images, tokens)

  def _check_tokens(self, token_ids):
    tokens = jnp.asarray(token_ids)
    limit = self.model.text_model.max_length
    if tokens.ndim != 2 or tokens.shape[1] > limit or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
        f"expected integer token ids (B, <= {limit}), got {tokens.dtype}{tokens.shape}"
      )
    return tokens.astype(jnp.int32)


def _check_images(images):
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    # Float images would silently skip the 0-255 scale the processor assumes.
    raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype}{images.shape}")
  return images

"""Inpainting without training: the known region held at the input image's latents at every step.

    images = pipeline.generate(params, prompts, sampler="ufogen", steps=1,
                               inpaint=inpainting.Inpaint(images_uint8, masks))

`masks` mark the region to repaint (white, as diffusers' inpainting pipelines take them); the rest
is kept. Each network call's x̂_0 is replaced where the latent is known by the input image's
latents z_0, and the prediction is handed back to the sampler re-derived from that x̂_0 and x_t.
Every sampler (DDIM, DPM-Solver++, UFOGen's one step) therefore ends on exactly z_0 in the known
region, and the repainted region is drawn against it at every step: the known part's blending of
RePaint (Lugmayr et al., 2022) and Blended Latent Diffusion (Avrahami et al., 2023), done on x̂_0
so no sampler loop needs a hook. It is the baseline a trained inpainting plugin must beat
(issue 42). A latent pixel is known only when every image pixel under it is.
"""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Inpaint:
  """uint8 images (N, H, W, 3) and masks (N, H, W), nonzero where the image is repainted."""

  images: np.ndarray
  masks: np.ndarray

  def check(self, num_images: int, resolution: int) -> None:
    """One error naming the shapes when they are not (num_images, resolution, resolution[, 3])."""
    images, masks = np.shape(self.images), np.shape(self.masks)
    wanted = (num_images, resolution, resolution)
    if images != (*wanted, 3) or masks != wanted:
      raise ValueError(
        f"inpainting images {images} and masks {masks}: this call needs {(*wanted, 3)} and "
        f"{wanted} (one of each per prompt, at the sampling resolution)"
      )


def latent_keep_mask(masks, downsample: int) -> jax.Array:
  """(N, h, w, 1) float: 1 where every pixel of the latent's downsample×downsample patch is kept."""
  repaint = jnp.asarray(masks) > 0
  n, h, w = repaint.shape
  patches = repaint.reshape(n, h // downsample, downsample, w // downsample, downsample)
  return 1.0 - patches.any(axis=(2, 4)).astype(jnp.float32)[..., None]


def prediction_from(schedule, x0, x_t, t, prediction: str):
  """The network output (ε, v or x_0 per `prediction`) whose (x̂_0, ε̂) reading at (x_t, t) is
  (x0, (x_t − α x0)/σ): the inverse of `NoiseSchedule.to_x0_and_eps`."""
  alpha, sigma = schedule.alpha_sigma(t, x_t)
  eps = (x_t - alpha * x0) / sigma
  if prediction == "eps":
    return eps
  if prediction == "v":
    return alpha * eps - sigma * x0
  if prediction == "x0":
    return x0
  raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")


def keep_known(denoise_fn, schedule, prediction: str, known_latents, keep):
  """`denoise_fn(x, t, *extra)` with x̂_0 set to `known_latents` where `keep` is 1."""

  def denoise(x, t, *extra):
    x0, _ = schedule.to_x0_and_eps(denoise_fn(x, t, *extra), x, t, prediction)
    x0 = keep * known_latents + (1.0 - keep) * x0
    return prediction_from(schedule, x0, x, t, prediction)

  return denoise


def load_inpaint(image_path, mask_path, resolution: int, num_images: int) -> Inpaint:
  """The `Inpaint` of an image file and a mask file (white: repaint) for `num_images` prompts,
  both resized and centre-cropped as the input pipeline does (`data/pipeline.Preprocess`; the mask
  through the same bicubic resize, then halved at 128). Files of different sizes, a missing or
  undecodable file: one error naming the flag and file."""
  from etils import epath
  from PIL import Image

  from md_jax.data.pipeline import Preprocess, Undecodable

  arrays, sizes = {}, {}
  for flag, path in (("--image", image_path), ("--mask", mask_path)):
    try:
      data = epath.Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError) as e:
      raise ValueError(f"{flag}={str(path)!r} is not an image file") from e
    out = Preprocess(resolution=resolution)({"image": data, "caption": "inpaint"}, None)
    if isinstance(out, Undecodable):
      raise ValueError(f"{flag}={str(path)!r}: {out.reason}")
    with Image.open(io.BytesIO(data)) as opened:  # the bytes read above, not a second read
      sizes[flag] = opened.size
    arrays[flag] = out["image"]
  if sizes["--image"] != sizes["--mask"]:
    raise ValueError(
      f"--image={str(image_path)!r} is {sizes['--image']} pixels and --mask={str(mask_path)!r} "
      f"{sizes['--mask']}: the mask must be the image's size"
    )
  mask = (arrays["--mask"].max(axis=-1) >= 128).astype(np.uint8)
  return Inpaint(
    np.broadcast_to(arrays["--image"], (num_images, *arrays["--image"].shape)),
    np.broadcast_to(mask, (num_images, *mask.shape)),
  )

"""The latent space a diffusion model works in: the frozen image↔latent map and its scale.

`build_latent_space` reads it from a config's `latents` block (pixels, a fixed projection, or a
trained `vae` / `decoder_distill` run). `LatentSpace.encode` maps images to the scaled latents the
UNet and the guiding latent classifier both see; `LatentSpace.decode` maps them back, for every
sampler, evaluator and exported program alike.
"""

import dataclasses
from typing import Any

import jax

from md_jax.infra import checkpoints
from md_jax.models import vae
from md_jax.models.projection_autoencoder import ProjectionAutoencoder


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """The frozen image↔latent map the UNet works in (`module` None: pixel space)."""

  module: Any
  pretrained_params: Any  # None: the module's own (random or fixed) init is used
  scale: float
  downsample: int

  def latent_shape(self, resolution: int, channels: int) -> tuple[int, int, int]:
    """The (h, w, c) latents of `channels` channels that images of `resolution` map to."""
    return resolution // self.downsample, resolution // self.downsample, channels

  def encode(self, params, images):
    """Images in [−1, 1] → scaled latents (the posterior mean for a VAE), as the UNet sees them."""
    if self.module is None:
      return images
    out = self.module.apply({"params": params}, images, method=type(self.module).encode)
    latents = out.mode() if isinstance(out, vae.DiagonalGaussian) else out
    return jax.lax.stop_gradient(latents) * self.scale

  def decode(self, params, latents):
    """Scaled latents → images in about [−1, 1] (the decoder's output, unclipped)."""
    if self.module is None:
      return latents
    return self.module.apply(
      {"params": params}, latents / self.scale, method=type(self.module).decode
    )


def build_latent_space(config) -> LatentSpace:
  """The latent space named by `config.latents.kind`: "pixels", "projection", "vae" or
  "untrained_vae" (random weights of `latents.vae_model`: for shape-only checks).

  "vae" reads the `vae` or `decoder_distill` checkpoint named by `config.latents.checkpoint`: its
  config rebuilds the model (the light decoder for `decoder_distill`), its state gives the params
  and the latent std the stage measured; latents are scaled by 1/std unless `latents.scale` ≠ 0.
  """
  latents = config.latents
  kind = latents.kind
  if kind == "pixels":
    return LatentSpace(None, None, 1.0, 1)
  if kind == "projection":
    module = ProjectionAutoencoder(latents.downsample, latents.channels)
    scale = latents.scale if latents.scale != 0 else 1.0
    return LatentSpace(module, None, scale, latents.downsample)
  if kind == "untrained_vae":
    # Shapes, memory and FLOPs of a VAE-latent run where no VAE run exists (the AOT compile, the
    # paper config's `:smoke`): `latents.vae_model`'s architecture with its random init. Never a
    # model to train on, hence a kind of its own rather than a missing checkpoint passing quietly.
    module = vae.autoencoder_from_config(latents.vae_model, light=True)
    return LatentSpace(module, None, 1.0, vae.downsample_factor(latents.vae_model))
  if kind != "vae":
    raise ValueError(
      f"config.latents.kind={kind!r}: expected 'pixels', 'projection', 'vae' or 'untrained_vae'"
    )
  if not latents.get("checkpoint"):
    raise ValueError(
      "config.latents.kind='vae' needs config.latents.checkpoint (a vae or decoder_distill workdir)"
    )
  what = "config.latents.checkpoint"
  saved, tree, _ = checkpoints.open_checkpoint(latents.checkpoint, what)
  module = vae.autoencoder_from_config(saved.model, light=saved.stage == "decoder_distill")
  params = vae.autoencoder_params(tree["frozen"], tree["autoencoder"]["params"])
  std = float(tree["latent_std"])
  if latents.scale == 0 and not std > 0:
    raise ValueError(
      f"config.latents.checkpoint={latents.checkpoint!r} has no measured latent std (the vae run "
      "stopped before its last step); finish it or set config.latents.scale"
    )
  if saved.model.latent_channels != config.model.in_channels:
    raise ValueError(
      f"config.model.in_channels={config.model.in_channels} but the VAE at "
      f"{latents.checkpoint!r} has {saved.model.latent_channels} latent channels"
    )
  scale = latents.scale if latents.scale != 0 else 1.0 / std
  return LatentSpace(module, params, scale, vae.downsample_factor(saved.model))

"""Representation alignment (REPA; Yu et al., 2025, "Representation Alignment for Generation").

A diffusion model learns, on the way to denoising, an internal representation of what the clean
image holds. REPA speeds that up by asking a projection of one of its inner maps at x_t to match,
location by location in cosine similarity, a frozen encoder's features of the clean image x_0.
Unlike a classifier's loss on the model's output x̂_0, the gradient reaches the UNet's inner
layers only: the output is still shaped by the denoising loss alone, so nothing rewards patterns
in x̂_0 that a classifier reads but a decoder renders as noise.

Here the encoder is a frozen `latent_classifier` run, read at t = 0 on the clean latent through
its last map (`NoisyLatentClassifier(..., feature_map=True)`): trained on the caption's
attributes, its map holds each shape's kind, colour and size where the shape is. The UNet's side
is its middle's map through a small head (`UNet.representation_dim`).
"""

import jax
import jax.numpy as jnp

from md_jax.training import latent_classifier


def load_encoder(align_config, pipeline, *, what: str, phase_latent_shapes=None):
  """The frozen latent classifier whose last map of the clean latent the UNet's representation is
  aligned with (`align_config`: {checkpoint, weight[, every_phase]}; the weight becomes its
  `scale`), checked against the pipeline's UNet, or None when the weight is 0. It reads no labels,
  so the data need none. The stage keeps its params in its state, as `training_guide`'s."""
  if not latent_classifier.loss_weight(align_config, what):
    return None
  encoder = latent_classifier.frozen_classifier(
    align_config, pipeline, what=what, phase_latent_shapes=phase_latent_shapes
  )
  check_shapes(pipeline.unet, encoder.model, encoder.latent_shape, what=what)
  return encoder


def check_shapes(unet, encoder_model, latent_shape, *, what: str) -> None:
  """Raises one clear error unless the UNet's representation at `latent_shape` latents has the
  encoder map's shape: both halve the map once per level after the first."""
  unet_side = latent_shape[0] // 2 ** (len(unet.channels) - 1)
  encoder_side = latent_shape[0] // 2 ** (len(encoder_model.channels) - 1)
  unet_shape = (unet_side, unet_side, unet.representation_dim)
  encoder_shape = (encoder_side, encoder_side, encoder_model.channels[-1])
  if unet_shape != encoder_shape:
    raise ValueError(
      f"{what}: the UNet's representation at {latent_shape} latents is {unet_shape} "
      f"(config.model.representation_dim={unet.representation_dim}) and the classifier's map is "
      f"{encoder_shape}: set representation_dim to {encoder_shape[-1]} and give both as many levels"
    )


def encoder_features(encoder_model, encoder_params, x0):
  """The frozen encoder's map of the clean latents x0 (B, h, w, C), read at t = 0, no gradient."""
  t = jnp.zeros((x0.shape[0],), jnp.int32)
  features = encoder_model.apply({"params": encoder_params}, x0, t, feature_map=True)
  return jax.lax.stop_gradient(features.astype(jnp.float32))


def cosine_alignment_loss(representation, target):
  """1 − the mean over examples and locations of the cosine similarity of two (B, h, w, C) maps:
  0 when every location points the target's way, 2 when opposite."""
  if representation.shape != target.shape:
    raise ValueError(f"representation {representation.shape} and target {target.shape} differ")
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-6)
  cosine = jnp.sum(unit(representation.astype(jnp.float32)) * unit(target), axis=-1)
  return 1.0 - jnp.mean(cosine)

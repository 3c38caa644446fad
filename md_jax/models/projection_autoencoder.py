"""A frozen, untrained stand-in autoencoder: space-to-depth and a fixed orthonormal projection.

The diffusion stage runs in the latent space of the VAE stage's checkpoint. Before one exists (or
in quick tests), `config.latents.kind = "projection"` gives latents of the same shape — f×
downsampled, c channels — from a random orthonormal map of each f×f×3 patch. It has no
adversarial or perceptual training, so it is no substitute for the VAE in image quality, but it is
a real deterministic encoder/decoder pair: decode(encode(x)) is the least-squares reconstruction.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def space_to_depth(x, f: int):
  b, h, w, c = x.shape
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x, f: int):
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c // (f * f))


def _orthonormal_columns(key, shape, dtype=jnp.float32):
  patch, channels = shape
  q, _ = jnp.linalg.qr(jax.random.normal(key, (patch, patch), jnp.float32))
  return q[:, :channels].astype(dtype)


class ProjectionAutoencoder(nn.Module):
  downsample: int = 8
  latent_channels: int = 8

  def setup(self):
    patch = self.downsample**2 * 3
    if self.latent_channels > patch:
      raise ValueError(
        f"latents.channels={self.latent_channels} exceeds the {patch} values of a "
        f"{self.downsample}x{self.downsample}x3 patch"
      )
    self.projection = self.param(
      "projection",
      nn.with_logical_partitioning(_orthonormal_columns, (None, None)),
      (patch, self.latent_channels),
    )

  def encode(self, images):
    return space_to_depth(images, self.downsample) @ self.projection

  def decode(self, latents):
    return depth_to_space(latents @ self.projection.T, self.downsample)

  def __call__(self, images):
    return self.decode(self.encode(images))

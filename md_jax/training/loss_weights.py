"""Weights of the diffusion loss: per timestep (min-SNR) and per latent location (edges)."""

import jax.numpy as jnp


def min_snr_weight(snr, gamma: float, prediction: str):
  """Min-SNR-γ loss weights (Hang et al., 2023), expressed for the chosen prediction target."""
  clipped = jnp.minimum(snr, gamma)
  return clipped / snr if prediction == "eps" else clipped / (snr + 1)


def edge_loss_weights(x0, strength: float):
  """Per-location loss weights 1 + strength · g / mean(g), with g the clean latent's local
  gradient norm (all channels, its 4 neighbours; edge-padded), the mean over each image.

  A shape's kind lives in its outline: a few latent pixels whose squared error is small beside a
  wrong colour's, so the plain loss teaches colours and places long before outlines. These
  weights leave flat regions at 1 and put `strength` times the image's average extra weight
  where the latent changes, i.e. on edges. (B, H, W, C) → (B, H, W, 1).
  """
  height, width = x0.shape[1:3]
  padded = jnp.pad(x0, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  neighbours = [
    padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
  ]
  squared = sum(jnp.square(x0 - n) for n in neighbours)
  g = jnp.sqrt(jnp.sum(squared, axis=-1, keepdims=True))
  g = g / (jnp.mean(g, axis=(1, 2, 3), keepdims=True) + 1e-6)
  return 1.0 + strength * g

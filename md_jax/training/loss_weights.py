"""Weights of the diffusion loss per timestep (min-SNR)."""

import jax.numpy as jnp


def min_snr_weight(snr, gamma: float, prediction: str):
  """Min-SNR-γ loss weights (Hang et al., 2023), expressed for the chosen prediction target."""
  clipped = jnp.minimum(snr, gamma)
  return clipped / snr if prediction == "eps" else clipped / (snr + 1)

"""Timestep conditioning: sinusoidal features and the MLP that every conv block reads."""

import math

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned


def timestep_embedding(
  t: jnp.ndarray, dim: int, *, max_period: float = 10000.0, flip_sin_to_cos: bool = True
) -> jnp.ndarray:
  """Sinusoidal features of (possibly fractional) timesteps, shape (B, dim), float32.

  Frequencies exp(-log(max_period) * i / half) and [cos, sin] order match the SD-1.5 UNet
  (diffusers `flip_sin_to_cos=True, downscale_freq_shift=0`), so ported weights see the same input.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
  args = jnp.asarray(t, jnp.float32).reshape(-1)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """Sinusoid(dim) -> Dense -> swish -> Dense: the shared time vector of width `features`."""

  sinusoid_dim: int = 320
  features: int = 1280
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    emb = timestep_embedding(t, self.sinusoid_dim).astype(self.dtype)
    emb = partitioned.dense(self.features, ("embed", "mlp"), name="dense_0", **kw)(emb)
    emb = nn.swish(emb)
    return partitioned.dense(self.features, ("mlp", "embed"), name="dense_1", **kw)(emb)


class GuidanceEmbedding(nn.Module):
  """The guidance scale w as a vector added to the time embedding (Meng et al., 2023, "On
  Distillation of Guided Diffusion Models"): a student distilled from a classifier-free-guided
  teacher takes w as a condition and predicts the guided output in one call.

  Sinusoid of 100·w (so that scales 1–10 spread over the sinusoid's periods as timesteps do) →
  Dense → swish → zero-initialised Dense: a UNet that gains it starts as the UNet it was
  copied from, for every w.
  """

  sinusoid_dim: int = 320
  features: int = 1280
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, guidance: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    emb = timestep_embedding(100.0 * guidance, self.sinusoid_dim).astype(self.dtype)
    emb = partitioned.dense(self.features, ("embed", "mlp"), name="dense_0", **kw)(emb)
    emb = nn.swish(emb)
    return partitioned.dense(self.features, ("mlp", "embed"), zero_init=True, name="dense_1", **kw)(
      emb
    )

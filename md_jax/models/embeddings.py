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
  """Sinusoid(dim) of `input_scale`·t -> Dense -> swish -> Dense: the shared time vector of width
  `features`.

  The same MLP embeds a distilled student's guidance scale w (Meng et al., 2023, "On
  Distillation of Guided Diffusion Models"), added to the time vector: `input_scale` 100 spreads
  scales 1–10 over the sinusoid's periods as timesteps are, and `zero_init_output` makes a UNet
  that gains it start as the UNet it was copied from, for every w.
  """

  sinusoid_dim: int = 320
  features: int = 1280
  input_scale: float = 1.0
  zero_init_output: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    emb = timestep_embedding(self.input_scale * jnp.asarray(t, jnp.float32), self.sinusoid_dim)
    emb = partitioned.dense(self.features, ("embed", "mlp"), name="dense_0", **kw)(
      emb.astype(self.dtype)
    )
    emb = nn.swish(emb)
    return partitioned.dense(
      self.features, ("mlp", "embed"), zero_init=self.zero_init_output, name="dense_1", **kw
    )(emb)

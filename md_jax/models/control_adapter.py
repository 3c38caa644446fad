"""A control plugin: a small conv network from a condition image to residuals for the UNet's
encoder levels (T2I-Adapter, Mou et al., 2023; MediaPipe's diffusion plugins; paper Sec. 4, 5.4).

    adapter = ControlAdapter.for_unet(unet, downsample=4)
    features = adapter.apply({"params": params}, condition)  # (B, H/f/2^i, W/f/2^i, c_i) per level
    unet.apply(..., adapter_features=features)

The condition (B, H, W, C) at pixel resolution in [−1, 1] is folded to the latent grid by pixel
unshuffle (f×f pixels → channels: no detail is averaged away before the first conv), then each
level runs residual conv blocks and a stride-2 conv to the next. Every level's output projection
is zero-initialised, so a new plugin leaves the base model's output exactly unchanged and training
starts from the base model's samples. The residuals do not depend on the timestep or caption, so a
sampler computes them once per image, not once per step, and any UNet of the same layout (the
UFOGen one-step generator finetuned from the base) reads them without retraining.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned


def pixel_unshuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """(B, H, W, C) → (B, H/f, W/f, C·f²): each f×f patch becomes channels."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"condition size {(h, w)} is not divisible by the latent factor {factor}")
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


class ResidualBlock(nn.Module):
  channels: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    h = partitioned.conv(self.channels, 3, name="conv_0", **kw)(nn.swish(x))
    h = partitioned.conv(self.channels, 3, name="conv_1", **kw)(nn.swish(h))
    return x + h


class ControlAdapter(nn.Module):
  """Condition image → one residual per UNet level (`UNet(adapter_features=...)`)."""

  # The width of each UNet level's input, what its residual must match: channels[0] at level 0,
  # channels[i − 1] at level i (a downsample keeps the width; the level's first block changes it).
  channels: Sequence[int]
  downsample: int  # pixels per latent along a side (the latent space's factor)
  in_channels: int = 1  # the condition's channels (`data/conditions.py`)
  width: float = 1.0  # hidden widths as a fraction of the UNet's
  blocks_per_level: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def for_unet(cls, unet, *, downsample: int, **fields) -> "ControlAdapter":
    """An adapter whose residuals fit `unet`'s levels (and its dtypes)."""
    widths = (unet.channels[0], *unet.channels[:-1])
    return cls(
      channels=widths, downsample=downsample, dtype=unet.dtype,
      param_dtype=unet.param_dtype, **fields,
    )  # fmt: skip

  @nn.compact
  def __call__(self, condition: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    if condition.ndim != 4 or condition.shape[-1] != self.in_channels:
      raise ValueError(
        f"condition is {condition.shape}; the plugin reads (B, H, W, {self.in_channels})"
      )
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    hidden = [max(8, round(c * self.width)) for c in self.channels]
    h = pixel_unshuffle(condition.astype(self.dtype), self.downsample)
    h = partitioned.conv(hidden[0], 3, name="conv_in", **kw)(h)
    features = []
    for level, (width, out) in enumerate(zip(hidden, self.channels)):
      if level:
        h = partitioned.conv(width, 3, strides=2, name=f"down_{level}", **kw)(nn.swish(h))
      for j in range(self.blocks_per_level):
        h = ResidualBlock(width, name=f"level_{level}_block_{j}", **kw)(h)
      # Zero-initialised: a new plugin is an exact no-op on the base model.
      proj = partitioned.conv(out, 1, zero_init=True, name=f"out_{level}", **kw)
      features.append(partitioned.constrain_image(proj(h)))
    return tuple(features)

"""Residual conv blocks with timestep injection, and the resampling convs between UNet levels.

Two block types, picked per level by the UNet config:

* `ResBlock` ("resnet"): the SD/LDM block — GN, swish, 3×3 conv, + Dense(temb), GN, swish,
  3×3 conv (zero-init, so a fresh block is the identity), 1×1 shortcut when widths differ.
* `SeparableBlock` ("separable"): the ConvNeXt-like block of MobileDiffusion Fig. 2 / Sec. 3.3 —
  3×3 depthwise conv, GN, + Dense(temb), pointwise expansion to `expansion`·C_out, swish,
  pointwise projection back to C_out (zero-init). Its parameters are ~2·e·C² instead of 18·C², which
  is what makes it cheap at the 1024-wide inner levels.

With `scale_shift=True` either block takes the embedding as a scale and a shift of the normalised
features, GN(h)·(1 + s) + b (ADM's "scale-shift norm", Dhariwal & Nichol 2021), instead of adding
it: the time and pooled caption then gate features multiplicatively, not only bias them.

`Downsample`/`Upsample` use a plain 3×3 conv (SD) or, with `separable=True`, a depthwise 3×3 +
pointwise 1×1 pair.
"""

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned

BLOCK_TYPES = ("resnet", "separable")


def _embedding_scale_shift(temb: jnp.ndarray, channels: int, kw) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(scale, shift), each (B, 1, 1, C), from one projection of the embedding."""
  proj = partitioned.dense(2 * channels, ("embed", "mlp"), name="temb_proj", **kw)(nn.swish(temb))
  scale, shift = jnp.split(proj[:, None, None, :], 2, axis=-1)
  return scale, shift


class ResBlock(nn.Module):
  out_channels: int
  num_groups: int = 32
  scale_shift: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray | None = None) -> jnp.ndarray:
    """`temb=None` (the VAE's blocks) leaves out the timestep projection."""
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    h = nn.swish(partitioned.group_norm(self.num_groups, name="norm_0", **kw)(x))
    h = partitioned.conv(self.out_channels, 3, name="conv_0", **kw)(h)
    if temb is not None and not self.scale_shift:  # SD's: added before the norm
      temb_proj = partitioned.dense(self.out_channels, ("embed", "mlp"), name="temb_proj", **kw)
      h = h + temb_proj(nn.swish(temb))[:, None, None, :]
    h = partitioned.group_norm(self.num_groups, name="norm_1", **kw)(h)
    if temb is not None and self.scale_shift:  # ADM's: scales and shifts after it
      scale, shift = _embedding_scale_shift(temb, self.out_channels, kw)
      h = h * (1 + scale) + shift
    h = nn.swish(h)
    h = partitioned.conv(self.out_channels, 3, zero_init=True, name="conv_1", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = partitioned.conv(self.out_channels, 1, name="shortcut", **kw)(x)
    return partitioned.constrain_image(x + h)


class SeparableBlock(nn.Module):
  out_channels: int
  expansion: int = 2
  num_groups: int = 32
  scale_shift: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    in_channels = x.shape[-1]
    h = partitioned.depthwise_conv(in_channels, 3, name="dw_conv", **kw)(x)
    h = partitioned.group_norm(self.num_groups, name="norm", **kw)(h)
    if self.scale_shift:
      scale, shift = _embedding_scale_shift(temb, in_channels, kw)
      h = h * (1 + scale) + shift
    else:
      t = partitioned.dense(in_channels, ("embed", "mlp"), name="temb_proj", **kw)(nn.swish(temb))
      h = h + t[:, None, None, :]
    hidden = self.expansion * self.out_channels
    h = nn.swish(partitioned.dense(hidden, ("embed", "mlp"), name="pw_0", **kw)(h))
    h = partitioned.dense(self.out_channels, ("mlp", "embed"), zero_init=True, name="pw_1", **kw)(h)
    if in_channels != self.out_channels:
      x = partitioned.conv(self.out_channels, 1, name="shortcut", **kw)(x)
    return partitioned.constrain_image(x + h)


def _resample_conv(module: nn.Module, x: jnp.ndarray, strides: int) -> jnp.ndarray:
  kw = {"dtype": module.dtype, "param_dtype": module.param_dtype}
  c = x.shape[-1]
  if module.separable:
    x = partitioned.depthwise_conv(c, 3, strides=strides, name="dw_conv", **kw)(x)
    return partitioned.dense(c, ("embed", "mlp"), name="pw", **kw)(x)
  return partitioned.conv(c, 3, strides=strides, name="conv", **kw)(x)


class Downsample(nn.Module):
  """Stride-2 3×3 conv (padding 1 on both sides, as SD), width unchanged."""

  separable: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return partitioned.constrain_image(_resample_conv(self, x, strides=2))


class Upsample(nn.Module):
  """Nearest-neighbour ×2 then a 3×3 conv, width unchanged."""

  separable: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return partitioned.constrain_image(_resample_conv(self, upsample_nearest_2x(x), strides=1))


def upsample_nearest_2x(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest ×2 of (B, H, W, C) as two concatenations and reshapes: exact copies for any dtype, no
  gather, and never above 4-D, which mobile runtimes accelerate (XNNPACK did not take the 6-D
  broadcast this used to be, the largest tensors of the 512 px decoder)."""
  b, h, w, c = x.shape
  x = jnp.concatenate([x, x], axis=-1).reshape(b, h, 2 * w, c)  # each pixel twice along W
  return jnp.concatenate([x, x], axis=2).reshape(b, 2 * h, 2 * w, c)  # each row twice along H


def conv_block(
  block_type: str,
  out_channels: int,
  *,
  name: str,
  num_groups: int,
  expansion: int,
  remat: bool,
  dtype,
  param_dtype,
  scale_shift: bool = False,
) -> nn.Module:
  """The block of `block_type` ("resnet" | "separable"), optionally rematerialised in backprop."""
  kw = {
    "num_groups": num_groups,
    "scale_shift": scale_shift,
    "dtype": dtype,
    "param_dtype": param_dtype,
    "name": name,
  }
  if block_type == "resnet":
    cls = nn.remat(ResBlock) if remat else ResBlock
    return cls(out_channels, **kw)
  if block_type == "separable":
    cls = nn.remat(SeparableBlock) if remat else SeparableBlock
    return cls(out_channels, expansion, **kw)
  raise ValueError(f"block type must be one of {BLOCK_TYPES}, got {block_type!r}")

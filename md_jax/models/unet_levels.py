"""The UNet's level modules: a down level, an up level and the innermost unit (`models/unet.py`).

`BlockOptions` carries the settings every block of one UNet shares, so each level module takes
one field instead of twenty; `_blocks` is the conv-block + transformer stack all three run.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned
from md_jax.models.conv_blocks import Downsample, Upsample, conv_block
from md_jax.models.transformer import SpatialTransformer


@dataclasses.dataclass(frozen=True)
class BlockOptions:
  """Settings shared by every block of one UNet (so level modules take one field, not twenty)."""

  norm_groups: int = 32
  separable_expansion: int = 2
  separable_resample: bool = False
  num_heads: int | None = None
  head_dim: int = 64
  shared_kv: bool = False
  attention_fn: str = "softmax"
  attention_implementation: str = "xla"  # or "cudnn" (GPU): models/attention.py
  ffn_expansion: int = 4
  ffn_activation: str = "gelu"
  scale_shift_norm: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def conv_block(self, block_type: str, out_channels: int, name: str) -> nn.Module:
    return conv_block(
      block_type,
      out_channels,
      name=name,
      num_groups=self.norm_groups,
      expansion=self.separable_expansion,
      remat=self.remat,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      scale_shift=self.scale_shift_norm,
    )

  def transformer(self, depth: int, self_attention: bool, name: str) -> nn.Module:
    return SpatialTransformer(
      depth=depth,
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      self_attention=self_attention,
      shared_kv=self.shared_kv,
      attention_fn=self.attention_fn,
      attention_implementation=self.attention_implementation,
      ffn_expansion=self.ffn_expansion,
      ffn_activation=self.ffn_activation,
      num_groups=self.norm_groups,
      remat=self.remat,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def resample(self, cls, block_type: str, name: str) -> nn.Module:
    separable = self.separable_resample and block_type == "separable"
    return cls(separable=separable, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


def _blocks(x, temb, context, opts, depths, self_attn, *, channels, block_type, prefix, skips=None):
  """Conv block + optional transformer per entry; pops a skip before each block when given.

  Returns the final activation and the output of every entry (the down path's skips).
  """
  outputs = []
  skips = None if skips is None else list(skips)
  for j, (depth, sa) in enumerate(zip(depths, self_attn)):
    if skips is not None:
      x = jnp.concatenate([x, skips.pop()], axis=-1)
    x = opts.conv_block(block_type, channels, f"{prefix}block_{j}")(x, temb)
    if depth:
      x = opts.transformer(depth, sa, f"{prefix}transformer_{j}")(x, context)
    outputs.append(x)
  return x, outputs


class DownLevel(nn.Module):
  channels: int
  block_type: str
  depths: tuple[int, ...]
  self_attention: tuple[bool, ...]
  opts: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x, temb, context):
    kw = {"channels": self.channels, "block_type": self.block_type, "prefix": ""}
    h, outputs = _blocks(x, temb, context, self.opts, self.depths, self.self_attention, **kw)
    return self.opts.resample(Downsample, self.block_type, "downsample")(h), [x, *outputs]


class UpLevel(nn.Module):
  channels: int
  block_type: str
  depths: tuple[int, ...]
  self_attention: tuple[bool, ...]
  upsample: bool = True
  opts: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x, temb, context, skips):
    kw = {"channels": self.channels, "block_type": self.block_type, "prefix": "", "skips": skips}
    x, _ = _blocks(x, temb, context, self.opts, self.depths, self.self_attention, **kw)
    if self.upsample:
      x = self.opts.resample(Upsample, self.block_type, "upsample")(x)
    return x


class Innermost(nn.Module):
  """Innermost down blocks + bottleneck + innermost up blocks (+ upsample): one searchable unit."""

  channels: int
  block_type: str
  down_depths: tuple[int, ...]
  down_self_attention: tuple[bool, ...]
  mid_depth: int
  mid_self_attention: bool
  up_depths: tuple[int, ...]
  up_self_attention: tuple[bool, ...]
  upsample: bool = True
  representation_dim: int = 0  # > 0: the representation head on the middle's output (UNet docs)
  opts: BlockOptions = BlockOptions()

  @nn.compact
  def __call__(self, x, temb, context, *, stop_after_mid: bool = False):
    opts, c, bt = self.opts, self.channels, self.block_type
    kw = {"channels": c, "block_type": bt}
    h, outputs = _blocks(
      x, temb, context, opts, self.down_depths, self.down_self_attention, prefix="down_", **kw
    )
    h = opts.conv_block(bt, c, "mid_block_0")(h, temb)
    if self.mid_depth:
      h = opts.transformer(self.mid_depth, self.mid_self_attention, "mid_transformer")(h, context)
    h = opts.conv_block(bt, c, "mid_block_1")(h, temb)
    if self.representation_dim:
      self.sow("intermediates", "representation", self._representation_head(h))
    if stop_after_mid:
      return h
    h, _ = _blocks(
      h,
      temb,
      context,
      opts,
      self.up_depths,
      self.up_self_attention,
      prefix="up_",
      skips=[x, *outputs],
      **kw,
    )
    if self.upsample:
      h = opts.resample(Upsample, bt, "upsample")(h)
    return h

  def _representation_head(self, h):
    """A per-location two-layer MLP from the middle's map to `representation_dim`, in float32."""
    kw = {"dtype": jnp.float32, "param_dtype": self.opts.param_dtype}
    h = partitioned.dense(2 * self.channels, ("embed", "mlp"), name="representation_hidden", **kw)(
      h.astype(jnp.float32)
    )
    return partitioned.dense(
      self.representation_dim, ("mlp", None), name="representation_out", **kw
    )(nn.swish(h))

"""Spatial transformer: (optional self-attn, cross-attn, gated FFN) layers over a feature map.

Matches the SD-1.5 `Transformer2DModel` layout (GroupNorm -> proj_in -> layers -> proj_out ->
residual) with linear proj_in/proj_out (a 1×1 conv has the same parameters), plus MobileDiffusion's
switches: self-attention can be dropped per stack while cross-attention stays (Sec. 3.2 "Decouple SA
from CA"), self-attention may share its K/V projection, and the GLU feed-forward has a configurable
activation (gelu = SD's GEGLU, swish = MD) and expansion ratio (4 in SD, 3 in MD).
"""

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned
from md_jax.models.attention import Attention

FFN_ACTIVATIONS = ("gelu", "swish")


class GatedFeedForward(nn.Module):
  """GLU FFN: d -> 2·r·d (value and gate in one kernel, like GEGLU) -> act(gate)·value -> d."""

  expansion: int = 4
  activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    width = x.shape[-1]
    hidden = self.expansion * width
    h = partitioned.dense(2 * hidden, ("embed", "mlp"), name="wi", **kw)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    if self.activation == "gelu":
      gate = nn.gelu(gate, approximate=False)
    elif self.activation == "swish":
      gate = nn.swish(gate)
    else:
      raise ValueError(f"ffn activation must be one of {FFN_ACTIVATIONS}, got {self.activation!r}")
    return partitioned.dense(width, ("mlp", "embed"), name="wo", **kw)(value * gate)


class TransformerLayer(nn.Module):
  """Pre-LN residual layer: [x += SA(LN x)] ; x += CA(LN x, text) ; x += FFN(LN x)."""

  num_heads: int = 8
  head_dim: int = 64
  self_attention: bool = True
  shared_kv: bool = False
  attention_fn: str = "softmax"
  attention_implementation: str = "xla"
  ffn_expansion: int = 4
  ffn_activation: str = "gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    attn = {
      "num_heads": self.num_heads,
      "head_dim": self.head_dim,
      "attention_fn": self.attention_fn,
      "implementation": self.attention_implementation,
    }
    if self.self_attention:
      h = partitioned.layer_norm(name="norm_self_attn", **kw)(x)
      x = x + Attention(shared_kv=self.shared_kv, name="self_attn", **attn, **kw)(h)
    h = partitioned.layer_norm(name="norm_cross_attn", **kw)(x)
    x = x + Attention(name="cross_attn", **attn, **kw)(h, context)
    h = partitioned.layer_norm(name="norm_ffn", **kw)(x)
    x = x + GatedFeedForward(self.ffn_expansion, self.ffn_activation, name="ffn", **kw)(h)
    return partitioned.constrain_tokens(x)


class SpatialTransformer(nn.Module):
  """`depth` TransformerLayers over the H·W tokens of a (B, H, W, C) map; zero-init proj_out.

  Heads: `num_heads` if set (SD-1.5 uses 8 at every width), else C // `head_dim`.
  """

  depth: int = 1
  num_heads: int | None = None
  head_dim: int = 64
  self_attention: bool = True
  shared_kv: bool = False
  attention_fn: str = "softmax"
  attention_implementation: str = "xla"
  ffn_expansion: int = 4
  ffn_activation: str = "gelu"
  num_groups: int = 32
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    b, height, width, c = x.shape
    num_heads = self.num_heads or max(c // self.head_dim, 1)
    if c % num_heads:
      raise ValueError(f"{c} channels do not split into {num_heads} heads")
    residual = x
    h = partitioned.group_norm(self.num_groups, epsilon=1e-6, name="norm", **kw)(x)
    h = h.reshape(b, height * width, c)
    h = partitioned.dense(c, ("embed", "mlp"), name="proj_in", **kw)(h)
    layer_cls = nn.remat(TransformerLayer) if self.remat else TransformerLayer
    for i in range(self.depth):
      h = layer_cls(
        num_heads=num_heads,
        head_dim=c // num_heads,
        self_attention=self.self_attention,
        shared_kv=self.shared_kv,
        attention_fn=self.attention_fn,
        attention_implementation=self.attention_implementation,
        ffn_expansion=self.ffn_expansion,
        ffn_activation=self.ffn_activation,
        name=f"layer_{i}",
        **kw,
      )(h, context)
    h = partitioned.dense(c, ("mlp", "embed"), zero_init=True, name="proj_out", **kw)(h)
    return partitioned.constrain_image(h.reshape(b, height, width, c) + residual)

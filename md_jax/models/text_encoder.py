"""CLIP text transformer (the ViT-L/14 text tower by default), numerically matching transformers.

MobileDiffusion conditions its UNet on the same frozen CLIP ViT-L/14 text encoder as Stable
Diffusion, so this module reproduces Hugging Face `CLIPTextModel` exactly (pre-LN blocks, causal
self-attention, quick-GELU MLP, final LayerNorm, EOS pooling) and loads its weights unchanged; see
`md_jax.models.clip_weights.load_clip_text_encoder` for where the real files go.

The encoder is frozen in every training stage: it has no trainable role, so the trainer keeps its
params outside the optimizer state and wraps its outputs in `jax.lax.stop_gradient` (or simply
never differentiates with respect to them). Nothing here enforces that, which keeps the module an
ordinary pure function that export and evaluation can reuse.

Parameter paths mirror the Hugging Face key names (`layers_3/self_attn/q_proj/kernel` <->
`encoder.layers.3.self_attn.q_proj.weight`), so the converter is a table rather than a search.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# What transformers.CLIPTextConfig assumes for a key that a config.json omits. These are not the
# ViT-L/14 sizes (the module defaults below are): a config that leaves a key out means what
# transformers would build from it, so the loaded weights line up.
HF_TEXT_CONFIG_DEFAULTS = {
  "vocab_size": 49408,
  "hidden_size": 512,
  "intermediate_size": 2048,
  "num_hidden_layers": 12,
  "num_attention_heads": 8,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
  "eos_token_id": 49407,
}

# Activation axes at block boundaries. Activations name their width "channels", not the params'
# "embed": under FSDP "embed" takes the fsdp mesh axis, which the batch already uses.
_ACTIVATION_AXES = ("batch", "length", "channels")


class TextEncoderOutput(NamedTuple):
  """Hugging Face's two outputs: UNet cross-attention reads the first, CLIP score the second."""

  last_hidden_state: jax.Array  # (B, T, hidden), after the final LayerNorm.
  pooled_output: jax.Array  # (B, hidden): last_hidden_state at each sequence's EOS token.


def _activation(name: str):
  # transformers' "gelu" is the exact erf form; the tanh variants go by other names there.
  activations = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  }
  if name not in activations:
    raise ValueError(f"hidden_act {name!r} is not supported; expected one of {sorted(activations)}")
  return activations[name]


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with HF's fused (embed, heads * head_dim) projections; causal for
  the text tower, bidirectional (`causal=False`) for the image tower.

  Kernels are 2-D `nn.Dense` rather than `nn.DenseGeneral` with a separate heads axis: DenseGeneral
  initialises a flattened kernel, and with a mesh active the logical-partitioning constraint then
  lands on the wrong rank and init fails. The fused axis is named "heads"; sharding it over a mesh
  axis that divides num_heads still splits whole heads.
  """

  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"hidden_size {width} is not divisible by num_heads {self.num_heads}")
    dense = lambda name, axes: nn.Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), axes),
      bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]),
      name=name,
    )
    split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, width // self.num_heads)
    q = split(dense("q_proj", ("embed", "heads"))(x))
    k = split(dense("k_proj", ("embed", "heads"))(x))
    v = split(dense("v_proj", ("embed", "heads"))(x))
    # The XLA implementation computes logits and softmax in float32 even for bf16 inputs, which
    # keeps the bf16 path close to the float32 reference.
    out = jax.nn.dot_product_attention(q, k, v, mask=padding_mask, is_causal=self.causal)
    return dense("out_proj", ("heads", "embed"))(out.reshape(x.shape))


class CLIPMLP(nn.Module):
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(
      self.intermediate_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("mlp",)),
      name="fc1",
    )(x)
    h = _activation(self.hidden_act)(h)
    return nn.Dense(
      width,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ("mlp", "embed")),
      bias_init=_partitioned(nn.initializers.zeros_init(), ("embed",)),
      name="fc2",
    )(h)


def _layer_norm(eps, dtype, param_dtype, name):
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
    bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
    name=name,
  )


class CLIPEncoderLayer(nn.Module):
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  causal: bool = True  # Last, so the text tower's positional construction keeps its meaning.

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    ln = lambda name: _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    h = ln("layer_norm1")(x)
    h = CLIPAttention(self.num_heads, self.dtype, self.param_dtype, self.causal, name="self_attn")(
      h, padding_mask
    )
    x = x + h
    h = ln("layer_norm2")(x)
    h = CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, self.param_dtype, name="mlp")(
      h
    )
    x = x + h
    return nn.with_logical_constraint(x, _ACTIVATION_AXES)


class CLIPTextEncoder(nn.Module):
  """The CLIP text tower; defaults are openai/clip-vit-large-patch14 (123M parameters).

  `dtype` is the compute dtype (bf16 on TPU halves activation memory; LayerNorm statistics and
  attention softmax stay float32), `param_dtype` the storage dtype. Outputs come back in `dtype`.
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_length: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # Pooling rule follows transformers: checkpoints whose config still says eos_token_id=2 (the
  # original openai configs) pool at argmax(input_ids), which is the EOS token because it has the
  # largest id in CLIP's vocabulary; otherwise pool at the first eos_token_id.
  eos_token_id: int = 49407
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_hf_config(cls, config: Any, **overrides) -> "CLIPTextEncoder":
    """Builds the module from a `config.json` dict or a transformers CLIPTextConfig/CLIPConfig.

    A full CLIPModel config is accepted too (its `text_config` is used), so one directory serves
    both. `overrides` sets module fields directly, e.g. `dtype=jnp.bfloat16`.
    """
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f"expected a config dict or transformers config, got {type(config)}")
    if isinstance(config.get("text_config"), Mapping):
      config = config["text_config"]
    get = lambda key: config[key] if config.get(key) is not None else HF_TEXT_CONFIG_DEFAULTS[key]
    fields = dict(
      vocab_size=int(get("vocab_size")),
      hidden_size=int(get("hidden_size")),
      intermediate_size=int(get("intermediate_size")),
      num_layers=int(get("num_hidden_layers")),
      num_heads=int(get("num_attention_heads")),
      max_length=int(get("max_position_embeddings")),
      hidden_act=str(get("hidden_act")),
      layer_norm_eps=float(get("layer_norm_eps")),
      eos_token_id=int(get("eos_token_id")),
    )
    _activation(fields["hidden_act"])  # Fail at construction, not at the first trace.
    fields.update(overrides)
    return cls(**fields)

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    train: bool = False,
  ) -> TextEncoderOutput:
    """Encodes (B, T) token ids, T <= max_length (CLIP tokenizers pad to 77).

    `attention_mask` (B, T), 1 for real tokens, hides padding keys on top of the causal mask, as
    in transformers; Stable-Diffusion-style conditioning passes none and lets the causal mask do
    the work. `train` is accepted so trainers call every module alike: CLIP has no dropout.
    """
    del train
    seq_len = input_ids.shape[-1]
    if seq_len > self.max_length:
      raise ValueError(f"sequence length {seq_len} exceeds max_length {self.max_length}")
    token_embedding = nn.Embed(
      self.vocab_size,
      self.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
      name="token_embedding",
    )
    position_embedding = self.param(
      "position_embedding",
      _partitioned(nn.initializers.normal(0.01), ("length", "embed")),
      (self.max_length, self.hidden_size),
      self.param_dtype,
    )
    x = token_embedding(input_ids) + jnp.asarray(position_embedding[:seq_len], self.dtype)
    x = nn.with_logical_constraint(x, _ACTIVATION_AXES)

    padding_mask = None
    if attention_mask is not None:
      padding_mask = attention_mask.astype(bool)[:, None, None, :]  # (B, heads, query, key).
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(
        self.num_heads,
        self.intermediate_size,
        self.hidden_act,
        self.layer_norm_eps,
        self.dtype,
        self.param_dtype,
        name=f"layers_{i}",
      )(x, padding_mask)
    x = _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(x)

    if self.eos_token_id == 2:
      eos_index = jnp.argmax(input_ids, axis=-1)
    else:
      eos_index = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eos_index[:, None, None], axis=1)[:, 0]
    return TextEncoderOutput(last_hidden_state=x, pooled_output=pooled)

"""Multi-head attention with the two MobileDiffusion switches: shared K/V and relu weights.

* `shared_kv` (paper Sec. 3.2, "Share key-value projections"): keys and values come from ONE
  projection (W_K = W_V, a single `key_value` kernel), so K and V are the same tensor. It is meant
  for self-attention; cross-attention keeps separate `key`/`value` kernels.
* `attention_fn="relu"` (Sec. 3.2, "Finetune softmax into relu", after Wortsman et al. 2023):
  weights relu(Q Kᵀ / sqrt(d)) / N with N the number of keys, instead of softmax(Q Kᵀ / sqrt(d)).
  The 1/sqrt(d) scale is kept so a softmax-trained checkpoint starts from logits of the same size
  when it is finetuned into relu attention; 1/N keeps the row sums O(1) like softmax's.

`implementation` picks how softmax attention is computed: "xla" (the einsums below on TPUs and
GPUs; when lowered for a CPU, `chunked_attention`'s loops over heads and query blocks, which
XLA:CPU runs several times faster at a thousand tokens and more) or "cudnn"
(`jax.nn.dot_product_attention`'s fused cuDNN flash-attention kernel, GPU only, bf16/fp16): the
same function without the (B, H, Lq, Lk) logits in memory and the transposes around them. The
mobile exports lower the plain einsums everywhere (`cpu_lowering.portable()`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from md_jax.models import cpu_lowering, partitioned
from md_jax.models.chunked_attention import chunked_attention

ATTENTION_FNS = ("softmax", "relu")
IMPLEMENTATIONS = ("xla", "cudnn")
# Below this many scores per head (Lq·Lk) the loop-free einsums are as fast on a CPU.
CHUNKED_MIN_SCORES = 1 << 16
# Queries per block of the CPU loops' backward pass: a (128, 4096) float32 tile is a core's
# 2 MiB of L2. Their forward pass takes larger blocks (`chunked_attention.FORWARD_SCORES`).
CHUNKED_QUERY_BLOCK = 128


def attention_weights(logits: jnp.ndarray, attention_fn: str) -> jnp.ndarray:
  """Normalised weights over the last (key) axis; softmax is computed in float32 for bf16 safety."""
  if attention_fn == "softmax":
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
  if attention_fn == "relu":
    return jax.nn.relu(logits) / logits.shape[-1]
  raise ValueError(f"attention_fn must be one of {ATTENTION_FNS}, got {attention_fn!r}")


def fused_softmax_attention(q, k, v, *, scale: float, implementation: str = "cudnn"):
  """Softmax attention through `jax.nn.dot_product_attention` with its keys padded to a multiple
  of 64, which cuDNN's flash attention requires in training (77 text tokens -> 128); the padding
  is masked out by the keys' true length. `implementation="xla"` runs the same call on any
  backend (the CPU tests check the padding that way)."""
  num_keys = k.shape[1]
  pad = [(0, 0), (0, -num_keys % 64), (0, 0), (0, 0)]
  return jax.nn.dot_product_attention(
    q,
    jnp.pad(k, pad),
    jnp.pad(v, pad),
    scale=scale,
    key_value_seq_lengths=jnp.full((k.shape[0],), num_keys, jnp.int32),
    implementation=implementation,
  )


def dot_product_attention(
  q, k, v, attention_fn: str = "softmax", implementation: str = "xla"
) -> jnp.ndarray:
  """q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)."""
  if attention_fn not in ATTENTION_FNS:
    raise ValueError(f"attention_fn must be one of {ATTENTION_FNS}, got {attention_fn!r}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
    )
  if implementation == "cudnn":
    if attention_fn != "softmax":
      raise ValueError(f"the cudnn attention implementation is softmax only, got {attention_fn!r}")
    return fused_softmax_attention(q, k, v, scale=q.shape[-1] ** -0.5, implementation="cudnn")
  einsums = functools.partial(einsum_attention, attention_fn=attention_fn)
  if q.shape[1] * k.shape[1] < CHUNKED_MIN_SCORES:
    return einsums(q, k, v)
  loops = lambda q, k, v: chunked_attention(q, k, v, attention_fn, CHUNKED_QUERY_BLOCK)
  return cpu_lowering.on_cpu(q, k, v, cpu=loops, default=einsums)


def einsum_attention(q, k, v, attention_fn: str = "softmax") -> jnp.ndarray:
  """The attention as two batched einsums around the (B, H, Lq, Lk) weights."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  weights = attention_weights(logits, attention_fn)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class Attention(nn.Module):
  """Self-attention (context=None) or cross-attention onto `context` (e.g. text tokens).

  q/k/v kernels are (embed, heads, kv) without bias and the output kernel (heads, kv, embed) with
  bias, which is the SD-1.5 layout (to_q/to_k/to_v bias-free, to_out with bias).
  """

  num_heads: int = 8
  head_dim: int = 64
  shared_kv: bool = False
  attention_fn: str = "softmax"
  implementation: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
    if self.attention_fn not in ATTENTION_FNS:
      raise ValueError(f"attention_fn must be one of {ATTENTION_FNS}, got {self.attention_fn!r}")
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    heads = (self.num_heads, self.head_dim)
    proj_axes = ("embed", "heads", "kv")
    context = x if context is None else context
    q = partitioned.dense_general(heads, proj_axes, name="query", **kw)(x)
    if self.shared_kv:
      k = v = partitioned.dense_general(heads, proj_axes, name="key_value", **kw)(context)
    else:
      k = partitioned.dense_general(heads, proj_axes, name="key", **kw)(context)
      v = partitioned.dense_general(heads, proj_axes, name="value", **kw)(context)
    out = dot_product_attention(q, k, v, self.attention_fn, self.implementation)
    return partitioned.dense_general(
      x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True, name="out", **kw
    )(out)

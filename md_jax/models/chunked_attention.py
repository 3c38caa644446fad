"""Attention for CPUs: one head and one block of queries at a time, with its own backward pass.

XLA:CPU is memory-bound on attention at 1,024-4,096 tokens: the plain einsums write the (B, H, Lq,
Lk) logits (537 MB at 4,096 tokens and 8 heads), read them for the softmax, write the weights,
transpose them for the second matmul, and the backward pass keeps them all. Here a loop over heads
and over blocks of queries keeps each step's (B, block, Lk) tile near the cores, and the backward
pass recomputes the tile from the saved log-sum-exp instead of storing it (the flash-attention
recipe, Dao et al. 2022, written as XLA loops). bf16 products are summed in float32, which
XLA:CPU runs on AMX-BF16 (`cpu_lowering.py`). On a 2-core Xeon this runs the SD-1.5-layout UNet's
4,096-token self-attention 5× faster than the einsums, 581 → 107 ms a layer, and its backward
pass about 6× (BENCHMARKS.md, 'Faster than diffusers').

TPUs and GPUs want the opposite (one large batched matmul; a serial loop over heads would idle the
chip), so `models/attention.py` picks this only when lowering for a CPU, and the mobile exports
never use it (`cpu_lowering.py`).
"""

import functools

import jax
import jax.numpy as jnp

from md_jax.models import cpu_lowering

# Scores per step of the forward loop (batch × query block × keys): up to this many, fewer and
# larger steps run faster; past it the tile spills further out of cache (2-core Xeon, 4,096 keys,
# batch 1, ms a layer, blocks of 128 / 512 / 1024 / 2048 queries: 214 / 138 / 128 / 148; batch 2:
# 366 / 297 / 791 / 1017). The backward pass keeps the caller's `block`: its step holds several
# (block, Lk) tiles at once.
FORWARD_SCORES = 1 << 22


def _query_block(num_queries: int, block: int) -> int:
  """The largest divisor of `num_queries` that is at most `block` (whole blocks, no padding)."""
  for size in range(min(block, num_queries), 0, -1):
    if num_queries % size == 0:
      return size
  return 1


def _forward_block(q, k, block: int) -> int:
  """The forward loop's query block: as large as `FORWARD_SCORES` allows, never below `block`."""
  batch, num_queries = q.shape[:2]
  return _query_block(num_queries, max(block, FORWARD_SCORES // (batch * k.shape[1])))


def _reblock(log_sum_exp, block):
  """(H, N, B, n) per-query values → (H, Lq/block, B, block)."""
  h, n, b, c = log_sum_exp.shape
  per_query = log_sum_exp.transpose(0, 2, 1, 3).reshape(h, b, n * c)
  return per_query.reshape(h, b, -1, block).transpose(0, 2, 1, 3)


def _blocks(x, block):
  """Per-query arrays (B, Lq, H, D) → (H, Lq/block, B, block, D)."""
  b, lq, h, d = x.shape
  return x.reshape(b, lq // block, block, h, d).transpose(3, 1, 0, 2, 4)


def _split(q, k, v, block):
  """Queries → `_blocks`; keys (B, Lk, H, D) → (H, B, D, Lk); values → (H, B, Lk, D)."""
  return _blocks(q, block), k.transpose(2, 0, 3, 1), v.transpose(2, 0, 1, 3)


def _merge(blocks):
  """(H, N, B, block, D) → (B, N·block, H, D)."""
  h, n, b, c, d = blocks.shape
  return blocks.transpose(2, 1, 3, 0, 4).reshape(b, n * c, h, d)


def _forward(q, k, v, attention_fn, block):
  """(out (B, Lq, H, D), log-sum-exp (H, N, B, block): zeros for relu, whose backward needs
  none)."""
  num_keys = k.shape[1]
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  blocks, keys, values = _split(q * scale, k, v, block)
  wider = cpu_lowering.accumulate_in_float32(q, k, v)  # bf16 on AMX; these loops run on CPUs only

  def head(args):
    q_h, k_h, v_h = args

    def one_block(q_c):
      logits = jnp.einsum("bqd,bdk->bqk", q_c, k_h, **wider)
      if attention_fn == "relu":
        weights = jax.nn.relu(logits).astype(v_h.dtype)
        out = jnp.einsum("bqk,bkd->bqd", weights, v_h, **wider).astype(v_h.dtype) / num_keys
        return out, jnp.zeros(q_c.shape[:2], jnp.float32)
      logits = logits.astype(jnp.float32)
      peak = jnp.max(logits, axis=-1, keepdims=True)
      weights = jnp.exp(logits - peak)
      total = jnp.sum(weights, axis=-1, keepdims=True)
      # Normalising the (block, D) output instead of the (block, Lk) weights: D ≪ Lk.
      out = jnp.einsum("bqk,bkd->bqd", weights.astype(v_h.dtype), v_h, **wider) / total
      return out.astype(v_h.dtype), (peak + jnp.log(total))[..., 0]

    return jax.lax.map(one_block, q_h)

  out, log_sum_exp = jax.lax.map(head, (blocks, keys, values))
  return _merge(out), log_sum_exp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_attention(q, k, v, attention_fn: str = "softmax", block: int = 512):
  """q: (B, Lq, H, D), k/v: (B, Lk, H, D) → (B, Lq, H, D), the same function as
  `attention.dot_product_attention` (softmax or relu weights, 1/sqrt(D) scale)."""
  return _forward(q, k, v, attention_fn, _forward_block(q, k, block))[0]


def _chunked_fwd(q, k, v, attention_fn, block):
  out, log_sum_exp = _forward(q, k, v, attention_fn, _forward_block(q, k, block))
  return out, (q, k, v, out, log_sum_exp)


def _chunked_bwd(attention_fn, block, residuals, d_out):
  q, k, v, out, log_sum_exp = residuals
  block = _query_block(q.shape[1], block)
  num_keys = k.shape[1]
  scale = q.shape[-1] ** -0.5
  blocks, keys, values = _split(q * jnp.asarray(scale, q.dtype), k, v, block)
  d_blocks = _blocks(d_out, block)
  log_sum_exp = _reblock(log_sum_exp, block)
  # Softmax's backward needs rowsum(dO ∘ O) per query: cheap, taken once over the whole output.
  delta = _blocks(jnp.sum(d_out.astype(jnp.float32) * out, axis=-1, keepdims=True), block)

  def head(args):
    q_h, k_h, v_h, do_h, lse_h, delta_h = args

    def one_block(carry, xs):
      dk_h, dv_h = carry
      q_c, do_c, lse_c, delta_c = xs
      logits = jnp.einsum("bqd,bdk->bqk", q_c, k_h).astype(jnp.float32)
      d_weights = jnp.einsum("bqd,bkd->bqk", do_c, v_h).astype(jnp.float32)
      if attention_fn == "relu":
        weights = jax.nn.relu(logits) / num_keys
        d_logits = jnp.where(logits > 0, d_weights / num_keys, 0.0)
      else:
        weights = jnp.exp(logits - lse_c[..., None])
        d_logits = weights * (d_weights - delta_c)
      d_logits = d_logits.astype(q_c.dtype)
      dv_h = dv_h + jnp.einsum("bqk,bqd->bkd", weights.astype(do_c.dtype), do_c)
      dk_h = dk_h + jnp.einsum("bqk,bqd->bdk", d_logits, q_c)  # q_c carries the scale
      dq_c = jnp.einsum("bqk,bdk->bqd", d_logits, k_h) * jnp.asarray(scale, q_c.dtype)
      return (dk_h, dv_h), dq_c

    zeros = (jnp.zeros(k_h.shape, jnp.float32), jnp.zeros(v_h.shape, jnp.float32))
    (dk_h, dv_h), dq_h = jax.lax.scan(one_block, zeros, (q_h, do_h, lse_h, delta_h))
    return dq_h, dk_h, dv_h

  dq, dk, dv = jax.lax.map(head, (blocks, keys, values, d_blocks, log_sum_exp, delta))
  # dk: (H, B, D, Lk) → (B, Lk, H, D); dv: (H, B, Lk, D) → (B, Lk, H, D).
  return (
    _merge(dq).astype(q.dtype),
    dk.transpose(1, 3, 0, 2).astype(k.dtype),
    dv.transpose(1, 2, 0, 3).astype(v.dtype),
  )


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)

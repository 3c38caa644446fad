"""The CPU attention loops (`models/chunked_attention.py`) against the plain einsums: values and
gradients, softmax and relu, sharded and not; and which one each platform and the exports lower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from md_jax.models import attention, cpu_lowering
from md_jax.models.chunked_attention import chunked_attention


def _qkv(batch, num_queries, num_keys, heads=3, head_dim=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = 2.0 * jax.random.normal(keys[0], (batch, num_queries, heads, head_dim))
  k, v = (jax.random.normal(key, (batch, num_keys, heads, head_dim)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  return q, k, v, cotangent


def _value_and_grads(attend, q, k, v, cotangent):
  out, vjp = jax.vjp(attend, q, k, v)
  return [out, *vjp(cotangent)]


@pytest.mark.parametrize(
  "attention_fn, num_queries, num_keys, block",
  [
    ("softmax", 96, 96, 32),  # several whole blocks
    ("softmax", 100, 77, 64),  # 100 queries in blocks of 50; text-length keys
    ("relu", 64, 48, 16),
  ],
)
def test_values_and_gradients_equal_the_einsums(attention_fn, num_queries, num_keys, block):
  q, k, v, cotangent = _qkv(2, num_queries, num_keys)
  chunked = jax.jit(
    lambda *a: _value_and_grads(lambda q, k, v: chunked_attention(q, k, v, attention_fn, block), *a)
  )(q, k, v, cotangent)
  einsums = _value_and_grads(
    lambda q, k, v: attention.einsum_attention(q, k, v, attention_fn), q, k, v, cotangent
  )
  for name, got, want in zip(("out", "dq", "dk", "dv"), chunked, einsums):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=name)


def test_bfloat16_stays_near_float32():
  q, k, v, _ = _qkv(1, 64, 64)
  want = attention.einsum_attention(q, k, v)
  got = chunked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), "softmax", 16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


def test_batch_sharded_over_devices_equals_one_device():
  q, k, v, cotangent = _qkv(8, 32, 32)
  mesh = jax.make_mesh((8,), ("data",))
  batch = NamedSharding(mesh, PartitionSpec("data"))
  attend = lambda *a: _value_and_grads(lambda q, k, v: chunked_attention(q, k, v, "softmax", 8), *a)
  sharded = jax.jit(attend)(*(jax.device_put(x, batch) for x in (q, k, v, cotangent)))
  single = jax.jit(attend)(q, k, v, cotangent)
  # Per device the loops' matmuls have batch 1, not 8: XLA:CPU's kernels sum in another order.
  for got, want in zip(sharded, single):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _lowered_text(platform, num_tokens):
  q = jax.ShapeDtypeStruct((1, num_tokens, 2, 8), jnp.float32)
  fn = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, "softmax"))
  return jax.export.export(fn, platforms=[platform])(q, q, q).mlir_module()


def test_loops_only_where_they_pay():
  """CPU lowering of a large attention loops; a small one, a TPU lowering and anything traced
  under `cpu_lowering.portable()` (the mobile exports) are the loop-free einsums."""
  large = int(np.sqrt(attention.CHUNKED_MIN_SCORES))
  assert "stablehlo.while" in _lowered_text("cpu", large)
  assert "stablehlo.while" not in _lowered_text("cpu", large // 2)
  assert "stablehlo.while" not in _lowered_text("tpu", large)
  with cpu_lowering.portable():
    assert "stablehlo.while" not in _lowered_text("cpu", large)


def test_unknown_attention_fn_is_an_error_at_every_size():
  q, k, v, _ = _qkv(1, 512, 512)
  with pytest.raises(ValueError, match="attention_fn.*'sigmoid'"):
    attention.dot_product_attention(q, k, v, "sigmoid")

"""bfloat16 on CPUs (`models/cpu_lowering.dot_general`, `models/cpu_conv.py`): matmuls sum in
float32 where lowered for a CPU (XLA:CPU runs that form on AMX-BF16), 3×3 convolutions up to
64×64 maps become matmuls, and TPU lowerings and the exports keep the plain bf16 ops. Values
against float32 references."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.models import cpu_conv, cpu_lowering, partitioned

_DIMS = (((1,), (0,)), ((), ()))


def _lowered(fn, platform, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def _dot_result_types(text):
  """The result element type of every dot_general in a StableHLO module."""
  return re.findall(r"stablehlo\.dot_general.*-> tensor<[0-9x]*x(\w+)>", text)


def test_cpu_dots_sum_bf16_in_float32_and_round_back():
  dot = lambda a, b: cpu_lowering.dot_general(a, b, _DIMS)
  assert _dot_result_types(_lowered(dot, "cpu", (64, 96), (96, 32))) == ["f32"]
  assert _dot_result_types(_lowered(dot, "tpu", (64, 96), (96, 32))) == ["bf16"]
  with cpu_lowering.portable():  # a new function: jit caches a traced one
    fresh = lambda a, b: cpu_lowering.dot_general(a, b, _DIMS)
    assert _dot_result_types(_lowered(fresh, "cpu", (64, 96), (96, 32))) == ["bf16"]
  a, b = (
    jax.random.normal(k, s)
    for k, s in zip(jax.random.split(jax.random.key(0)), ((64, 96), (96, 32)))
  )
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  got = jax.jit(dot)(a16, b16)
  assert got.dtype == jnp.bfloat16
  # The f32 sum of the same bf16 products, rounded once: at most half a bf16 ulp apart, plus
  # the f32 sum's own reordering.
  want = np.asarray(a16, np.float32) @ np.asarray(b16, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-8, atol=1e-3)
  # float32 operands are untouched: the plain dot on every platform.
  assert cpu_lowering.accumulate_in_float32(a, b16) == {}


def test_dense_layers_take_the_cpu_dot():
  layer = partitioned.dense(32, name="dense", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x = jnp.ones((4, 96), jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  text = jax.export.export(jax.jit(layer.apply), platforms=["cpu"])(params, x).mlir_module()
  assert _dot_result_types(text) == ["f32"]


@pytest.mark.parametrize(
  "shape, as_matmul",
  [
    ((1, 8, 8, 16), True),  # bf16: few channels too
    ((2, 64, 64, 32), True),  # the largest map that takes the matmul in bf16
    ((1, 128, 64, 32), False),  # larger: XLA's convolution
  ],
)
def test_bf16_convolutions_as_matmuls_up_to_64x64(shape, as_matmul):
  features = 24
  x = jax.random.normal(jax.random.key(0), shape)
  layer = partitioned.conv(features, 3, name="conv", dtype=jnp.bfloat16)
  params = nn.meta.unbox(layer.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  reference = layer.clone(conv_general_dilated=jax.lax.conv_general_dilated, dtype=jnp.float32)
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  text = jax.export.export(jax.jit(layer.apply), platforms=["cpu"])(params16, x).mlir_module()
  assert ("stablehlo.convolution" not in text) == as_matmul
  tpu = jax.export.export(jax.jit(layer.apply), platforms=["tpu"])(params16, x).mlir_module()
  assert "stablehlo.convolution" in tpu
  got = jax.jit(layer.apply)(params16, x)
  assert got.dtype == jnp.bfloat16
  # Against the float32 convolution of the same bf16-rounded weights and inputs.
  want = reference.apply(
    jax.tree.map(lambda p: p.astype(jnp.float32), params16),
    x.astype(jnp.bfloat16).astype(jnp.float32),
  )
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2**-7 * scale)


def test_unfold_moves_bf16_channel_pairs_as_they_are():
  """The uint32 packing of `_unfold` is a pure relayout: the same windows as the plain concat."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6)).astype(jnp.bfloat16)
  padding = [(1, 1), (1, 1)]
  got = cpu_conv._unfold(x, 3, 3, padding)
  padded = jnp.pad(x.astype(jnp.float32), ((0, 0), *padding, (0, 0)))
  want = jnp.concatenate([padded[:, i : i + 5, j : j + 7] for i in range(3) for j in range(3)], -1)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want))

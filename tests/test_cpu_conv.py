"""Convolutions as matmuls on CPUs (`models/cpu_conv.py`) against XLA's convolution: values and
gradients; which shapes take the matmul; and that TPUs and the exports keep the convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.models import cpu_conv, cpu_lowering, partitioned


def _conv_layer(features, kernel_size, padding=None):
  return partitioned.conv(features, kernel_size, padding=padding, name="conv")


@pytest.mark.parametrize(
  "shape, features, kernel_size, padding",
  [
    ((2, 8, 8, 192), 24, 3, None),  # 3×3 on a small map, many channels: im2col
    ((1, 16, 16, 256), 8, 3, None),  # the largest map that takes the matmul
    ((2, 32, 32, 192), 8, 3, None),  # larger: XLA's convolution
    ((2, 8, 8, 16), 8, 3, None),  # few channels: XLA's convolution
    ((2, 12, 12, 16), 8, 1, None),  # 1×1: a plain matmul
    ((2, 6, 6, 192), 8, 3, 0),  # valid padding
  ],
)
def test_values_and_gradients_equal_the_convolution(shape, features, kernel_size, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  layer = _conv_layer(features, kernel_size, padding)
  params = nn.meta.unbox(layer.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  reference = layer.clone(conv_general_dilated=jax.lax.conv_general_dilated)

  def value_and_grads(module):
    loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  got, want = value_and_grads(layer), value_and_grads(reference)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _lowered_text(platform, shape, kernel_size):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  k = jax.ShapeDtypeStruct((kernel_size, kernel_size, shape[-1], 8), jnp.float32)
  pad = [(kernel_size // 2, kernel_size // 2)] * 2
  dims = jax.lax.conv_dimension_numbers(shape, k.shape, ("NHWC", "HWIO", "NHWC"))
  fn = jax.jit(
    lambda x, k: cpu_conv.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=dims)
  )
  return jax.export.export(fn, platforms=[platform])(x, k).mlir_module()


def test_matmuls_only_on_cpus_and_where_they_pay():
  small = (1, 16, 16, 256)
  assert "stablehlo.convolution" not in _lowered_text("cpu", small, 3)
  assert "stablehlo.convolution" not in _lowered_text("cpu", (1, 64, 64, 8), 1)
  assert "stablehlo.convolution" in _lowered_text("cpu", (1, 32, 32, 256), 3)
  assert "stablehlo.convolution" in _lowered_text("cpu", (1, 16, 16, 128), 3)
  assert "stablehlo.convolution" in _lowered_text("tpu", small, 3)
  with cpu_lowering.portable():
    assert "stablehlo.convolution" in _lowered_text("cpu", small, 3)

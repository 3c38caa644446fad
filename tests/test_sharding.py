"""Mesh construction and logical-axis → NamedSharding conversion."""

import math
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from md_jax.infra import sharding
from md_jax.models import partitioned


@pytest.mark.parametrize(
  "shape, expected", [((-1, 1), (8, 1)), ((2, -1), (2, 4)), ({"data": 1, "fsdp": -1}, (1, 8))]
)
def test_mesh_sizes(shape, expected):
  mesh = sharding.create_mesh(shape)
  assert mesh.axis_names == ("data", "fsdp")
  assert tuple(mesh.shape.values()) == expected


@pytest.mark.parametrize("shape", [(3, -1), (2, 2), (-1, -1), (0, 8)])
def test_mesh_that_does_not_fit_the_devices_is_refused(shape):
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.create_mesh(shape)


class _Dense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
      (x.shape[-1], self.features),
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (self.features,)
    )
    return x @ kernel + bias


def test_logical_to_shardings_shards_embed_over_fsdp_and_keeps_indivisible_dims_replicated():
  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  for in_features, expected in ((16, P("fsdp", None)), (3, P(None, None))):
    abstract = jax.eval_shape(_Dense(8).init, jax.random.key(0), jnp.ones((1, in_features)))
    shardings = sharding.logical_to_shardings(abstract, mesh, rules)
    assert shardings["params"]["kernel"].spec == expected
    assert shardings["params"]["bias"].spec == P(None)


def test_sharded_init_puts_a_quarter_of_the_kernel_on_each_device():
  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  x = jnp.ones((1, 16))
  abstract = jax.eval_shape(_Dense(8).init, jax.random.key(0), x)
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  params = jax.jit(lambda k: nn.meta.unbox(_Dense(8).init(k, x)), out_shardings=shardings)(
    jax.random.key(0)
  )
  shard_shapes = {s.data.shape for s in params["params"]["kernel"].addressable_shards}
  assert shard_shapes == {(4, 8)}


def test_batch_sharding_uses_both_mesh_axes():
  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  assert sharding.batch_sharding(mesh, rules, ndim=2).spec == P(("data", "fsdp"), None)
  assert sharding.batch_axis_size(mesh, rules) == 8


@pytest.mark.parametrize("forced, expected", [(None, 2), ("3", 3)])
def test_split_cpu_host_unless_xla_flags_force_a_count(forced, expected):
  # A fresh interpreter: the device count is fixed at JAX's first operation.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  if forced:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={forced}"
  code = (
    "import jax; from md_jax.infra import sharding; sharding.split_cpu_host(2); "
    "print(jax.device_count())"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=pathlib.Path(__file__).parents[1],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split()[-1] == str(expected)


def _all_gathered_elements(hlo_text: str) -> int:
  """How many elements the compiled program's all-gathers produce, summed."""
  total = 0
  for line in hlo_text.splitlines():
    if " all-gather(" in line or " all-gather-start(" in line:
      dims = re.search(r"= \(?[a-z0-9]+\[([\d,]*)\]", line).group(1)
      total += math.prod(int(d) for d in dims.split(",") if d)
  return total


def test_a_depthwise_conv_under_fsdp_gathers_its_kernel_not_the_batch():
  """With its filters split over fsdp, XLA runs a grouped conv channel-parallel and all-gathers
  the input's whole global batch on every chip (two v5e slices ran out of HBM for it):
  the kernel's channels stay whole, and the step gathers at most the kernel."""
  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  conv = partitioned.depthwise_conv(32, 3, name="dw_conv")
  x = jnp.ones((16, 8, 8, 32))
  abstract = jax.eval_shape(conv.init, jax.random.key(0), x)
  params = jax.tree.map(
    lambda a, s: jax.device_put(jnp.ones(a.shape, a.dtype), s),
    nn.meta.unbox(abstract),
    sharding.logical_to_shardings(abstract, mesh, rules),
  )
  x = jax.device_put(x, sharding.batch_sharding(mesh, rules, ndim=4))
  loss = jax.jit(jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2)))
  gathered = _all_gathered_elements(loss.lower(params, x).compile().as_text())
  assert gathered <= 3 * 3 * 32 + 32, gathered  # the kernel and bias at most; the batch is 32768

"""Mesh construction and logical-axis → NamedSharding conversion."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from md_jax.infra import sharding


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

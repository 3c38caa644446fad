"""Dense, conv and norm layers whose parameters carry logical axis names.

Every md_jax parameter is created through these factories so that `jax.eval_shape(init)` yields
`nn.LogicallyPartitioned` boxes everywhere and `infra.sharding.logical_to_shardings` can place
each one without a per-model table. Kernels put the FSDP-sharded "embed" axis on the input width
(output width for the projections back into the residual stream), biases and norm scales are small
and stay replicated.

Conv kernels are named ("conv_kernel", None, "embed", "mlp"): flax rejects a logical name that
occurs twice in one array, and the spatial taps are never worth sharding, so only the first tap
axis carries the name.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from md_jax.models import cpu_conv, cpu_lowering

CONV_KERNEL_AXES = ("conv_kernel", None, "embed", "mlp")
# A depthwise kernel's channels are named like the activations' ("channels": kept whole), not
# "embed" (FSDP-sharded): with its filters split over fsdp, XLA's SPMD partitioner runs the
# grouped conv channel-parallel, all-gathering the input's whole global batch on every chip, where
# gathering the 9·C-float kernel costs nothing (BENCHMARKS.md, 'Two slices').
DEPTHWISE_KERNEL_AXES = ("conv_kernel", None, None, "channels")

_default_kernel_init = nn.initializers.lecun_normal()


def zeros_of_init(init_fn):
  """The boxed params `init_fn()` returns, with their shapes, dtypes and logical axes, as zeros:
  for params a checkpoint fills in, whose random draws would only cost their compile (most of an
  init's program: ~10 s for the main job's UNet on XLA:CPU at the tests' settings)."""
  return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), jax.eval_shape(init_fn))


def _kernel_init(zero_init: bool, base=None):
  if zero_init:
    return nn.initializers.zeros_init()
  return base if base is not None else _default_kernel_init


def dense(
  features: int,
  axes: tuple = ("embed", "mlp"),
  *,
  name: str,
  use_bias: bool = True,
  zero_init: bool = False,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
) -> nn.Dense:
  """A Dense layer; `zero_init` makes it an identity-preserving residual output projection."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(_kernel_init(zero_init), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
    dot_general=cpu_lowering.dot_general,  # bf16 on a CPU: AMX, accumulated in f32
    name=name,
  )


class DenseGeneral(nn.Module):
  """Projection contracting input `axis` into `features`, kernel created at its full rank.

  Unlike `nn.DenseGeneral`, which initialises a flattened 2-D kernel and reshapes it, the kernel
  is initialised in its final (in..., out...) shape: the logical names then always match its
  rank, which flax checks (abstractly, on every apply) when a mesh is active.
  """

  features: tuple[int, ...]
  axis: tuple[int, ...]
  kernel_axes: tuple
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    n_in, n_out = len(in_shape), len(self.features)
    # lecun_normal over the true fan-in (the product of all contracted axes).
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal",
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)),
    )  # fmt: skip
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, self.kernel_axes),
      in_shape + self.features,
      self.param_dtype,
    )
    bias = None
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[n_in:]),
        self.features,
        self.param_dtype,
      )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    out = cpu_lowering.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())))
    return out if bias is None else out + bias


def dense_general(
  features: int | Sequence[int],
  axes: tuple,
  *,
  name: str,
  axis: int | Sequence[int] = -1,
  use_bias: bool = False,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
) -> DenseGeneral:
  """Multi-axis projection (attention heads keep their ("heads", "kv") axes in the kernel)."""
  return DenseGeneral(
    features=tuple(features) if isinstance(features, Sequence) else (features,),
    axis=tuple(axis) if isinstance(axis, Sequence) else (axis,),
    kernel_axes=tuple(axes),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def conv(
  features: int,
  kernel_size: int = 3,
  *,
  name: str,
  strides: int = 1,
  padding: int | None = None,
  zero_init: bool = False,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
) -> nn.Conv:
  """A k×k conv with symmetric padding (PyTorch/SD semantics, also for stride 2).

  `padding` defaults to k//2 ("same" for odd k); PatchGAN's 4×4 convs use 1.
  """
  pad = kernel_size // 2 if padding is None else padding
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(_kernel_init(zero_init), CONV_KERNEL_AXES),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
    conv_general_dilated=cpu_conv.conv_general_dilated,  # matmuls where XLA:CPU's conv is slow
    name=name,
  )


def depthwise_conv(
  features: int,
  kernel_size: int = 3,
  *,
  name: str,
  strides: int = 1,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
) -> nn.Conv:
  """A depthwise k×k conv (one filter per channel): the spatial half of a separable conv."""
  pad = kernel_size // 2
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=features,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.with_logical_partitioning(_default_kernel_init, DEPTHWISE_KERNEL_AXES),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
    name=name,
  )


def _norm_inits():
  return {
    "scale_init": nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
    "bias_init": nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
  }


class GroupNorm(nn.Module):
  """GroupNorm over a channels-last map or sequence: flax's parameters ("scale", "bias") and math
  (float32 statistics, var = E[x²] − E[x]², then (x − mean)·rsqrt(var + ε)·scale + bias).

  The statistics are reduced over the spatial axes first (a ≤ 4-D mean, per channel), then over
  each group's channels on the small (batch, channels) result. flax reduces one 5-D
  (…, groups, channels/group) view instead, which mobile runtimes do not accelerate: exported to
  LiteRT, XNNPACK left those means to the reference kernels, 1.7× JAX's latency on the 512 px
  decoder. On TPU and GPU XLA fuses both forms alike.
  """

  num_groups: int
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {self.num_groups} groups")
    inits = _norm_inits()
    scale = self.param("scale", inits["scale_init"], (channels,), self.param_dtype)
    bias = self.param("bias", inits["bias_init"], (channels,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    stat_shape = (x.shape[0],) + (1,) * len(spatial) + (channels,)

    def group_mean(per_channel):  # (batch, 1…, C) → each group's mean, broadcast to its channels
      grouped = per_channel.reshape(x.shape[0], self.num_groups, channels // self.num_groups)
      mean = jnp.mean(grouped, axis=-1, keepdims=True)
      return jnp.broadcast_to(mean, grouped.shape).reshape(stat_shape)

    mean = group_mean(jnp.mean(x32, axis=spatial, keepdims=True))
    mean_of_squares = group_mean(jnp.mean(jnp.square(x32), axis=spatial, keepdims=True))
    var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    return ((x32 - mean) * mul + bias.astype(jnp.float32)).astype(self.dtype)


def group_norm(
  num_groups: int, *, name: str, epsilon: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32
) -> GroupNorm:
  """GroupNorm with statistics in float32 even for a bf16 `dtype`, as flax's."""
  return GroupNorm(
    num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name
  )


def layer_norm(
  *, name: str, epsilon: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32
) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name, **_norm_inits()
  )


# Activations at block boundaries: spatial maps and token sequences.
constrain_image = functools.partial(
  nn.with_logical_constraint, logical_axis_resources=("batch", "height", "width", "channels")
)
constrain_tokens = functools.partial(
  nn.with_logical_constraint, logical_axis_resources=("batch", "length", "channels")
)

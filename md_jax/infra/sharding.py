"""Device mesh and logical-axis sharding.

Every parameter and block-boundary activation in md_jax names its axes logically ("embed", "mlp",
"batch", ...). The config maps logical names to mesh axes, so the same model runs replicated on one
CPU, FSDP-sharded on 8 fake devices, or across a pod, by changing `config.mesh` and
`config.logical_axis_rules` only.
"""

import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# Logical axis vocabulary used by md_jax modules, and where each lives by default. "batch" is split
# over both mesh axes (FSDP also splits the batch); "embed" (a parameter's input width) is the axis
# FSDP shards; activations name their width "channels" (replicated), since a mesh axis cannot
# split both an activation's batch and its width. Everything else is replicated.
DEFAULT_LOGICAL_AXIS_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", None),
  ("heads", None),
  ("kv", None),
  ("vocab", None),
  ("length", None),
  ("height", None),
  ("width", None),
  ("channels", None),
  ("conv_kernel", None),
  ("norm", None),
)


def split_cpu_host(num_devices: int) -> None:
  """Makes XLA's CPU backend `num_devices` devices, for a data-parallel step across CPU cores.

  XLA:CPU leaves cores idle during one device's many small ops; as two devices (the batch split
  over them) the main job's diffusion step ran 1.3x faster on 2 cores, 1.4x with its VAE
  encoder (BENCHMARKS.md, train-step section).
  Only the CPU backend changes, so accelerator hosts are unaffected. A device count forced in
  XLA_FLAGS (the tests' 8 fake devices) wins. Must run before JAX's first operation.
  `configs/main.py` sets `cpu_devices`; `md_jax.main` calls this before anything else.
  """
  if num_devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", num_devices)


def create_mesh(mesh_shape: dict | Sequence[int], devices=None) -> Mesh:
  """Builds a ("data", "fsdp") mesh over all devices; a size of -1 takes the remaining devices.

  `mesh_shape` is a mapping {"data": d, "fsdp": f[, "dcn_data": s][, "num_devices": n]} (a
  ConfigDict works) or a pair (d, f). `dcn_data` > 1 spreads the data axis over that many
  slices (multi-slice TPU: data parallelism over the data-center network between slices, FSDP
  and the rest of the data axis over each slice's ICI, as maxdiffusion's dcn_data_parallelism).
  """
  devices = jax.devices() if devices is None else devices
  dcn = 1
  if isinstance(mesh_shape, Sequence):
    sizes = list(mesh_shape)
  else:
    sizes = [int(mesh_shape[axis]) for axis in MESH_AXES]
    # `num_devices` (optional, -1 = all) runs on the first N devices: debugging a sharded job
    # on one device of many, or comparing a 1-device run with an 8-device one in one process.
    num = int(mesh_shape.get("num_devices", -1)) if hasattr(mesh_shape, "get") else -1
    if num > 0:
      if num > len(devices):
        raise ValueError(f"config.mesh.num_devices={num} but there are {len(devices)} devices")
      devices = devices[:num]
    dcn = int(mesh_shape.get("dcn_data", 1)) if hasattr(mesh_shape, "get") else 1
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"config.mesh needs sizes for axes {MESH_AXES}, got {sizes}")
  num_devices = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(
      f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices"
    )
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} devices, "
      f"but there are {num_devices}"
    )
  if dcn > 1:
    return Mesh(_multi_slice_grid(sizes, dcn, devices), MESH_AXES)
  # mesh_utils orders devices so that the inner ("fsdp") axis maps to the fastest interconnect.
  device_grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  return Mesh(device_grid, MESH_AXES)


def _multi_slice_grid(sizes: list[int], dcn: int, devices) -> np.ndarray:
  """The device grid of a data axis spread over `dcn` slices: each slice holds data/dcn × fsdp
  devices laid out over its ICI, and the slices stack along the data axis."""
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) != dcn:
    raise ValueError(
      f"config.mesh.dcn_data={dcn}, but the {len(devices)} devices form {len(slices)} slice(s)"
    )
  data, fsdp = sizes
  if data % dcn:
    raise ValueError(f"config.mesh.data={data} does not split over config.mesh.dcn_data={dcn}")
  return mesh_utils.create_hybrid_device_mesh([data // dcn, fsdp], [dcn, 1], devices=devices)


def logical_axis_rules(config_rules=None) -> tuple[tuple[str, object], ...]:
  """Rules from the config (a list of [logical, mesh axis or axes or None]) or the defaults."""
  if config_rules is None:
    return DEFAULT_LOGICAL_AXIS_RULES
  rules = []
  for rule in config_rules:
    logical, mesh_axes = rule
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    rules.append((logical, mesh_axes))
  return tuple(rules)


def _fit_spec_to_shape(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide, keeping the rest of the spec.

  A 3-channel RGB input conv cannot split its 3 input channels 4 ways; replicating that one
  dimension is what a user wants, not a compile error.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for axis in axes:
      if dim % (size * mesh.shape[axis]) == 0:
        kept.append(axis)
        size *= mesh.shape[axis]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted)


def logical_to_shardings(abstract_tree, mesh: Mesh, rules):
  """Turns an abstract pytree whose leaves carry logical partitioning into `NamedSharding`s.

  `abstract_tree` is typically `jax.eval_shape(init_fn, ...)`: leaves are
  `nn.LogicallyPartitioned` boxes (from `nn.with_logical_partitioning`) or plain shape structs,
  which are replicated. The result has the same structure with boxes unwrapped.
  """
  logical_specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  shapes = nn.meta.unbox(abstract_tree)

  def to_sharding(spec, leaf):
    spec = PartitionSpec() if spec is None else spec
    return NamedSharding(mesh, _fit_spec_to_shape(spec, leaf.shape, mesh))

  return jax.tree.map(
    to_sharding, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
  )


def create_sharded_state(init_state, rng, mesh: Mesh, rules):
  """(abstract state with target shardings, shardings, a jitted `rng -> state`).

  `jax.eval_shape(init_state)` gives the boxed shapes and logical axes; the jitted init then
  creates every leaf directly in its `NamedSharding`, never whole on one device.
  """
  boxed = jax.eval_shape(init_state, rng)
  shardings = logical_to_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  init = jax.jit(lambda r: nn.meta.unbox(init_state(r)), out_shardings=shardings)
  return abstract, shardings, init


def jit_train_step(train_step, state_shardings, batch_shardings):
  """`train_step(state, batch) -> (state, metrics)` jitted as every caller compiles it (the
  trainer, the TPU ahead-of-time check, the benchmarks): the state in and out on its shardings
  and donated, the batch on its own, the metrics where XLA puts them."""
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_shardings),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a global batch: leading axis over the mesh axes that "batch" maps to."""
  batch_axes = dict(rules).get("batch")
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))


def batch_axis_size(mesh: Mesh, rules) -> int:
  """How many ways the batch is split; the global batch must be a multiple of it."""
  batch_axes = dict(rules).get("batch")
  if batch_axes is None:
    return 1
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
  return int(np.prod([mesh.shape[a] for a in batch_axes]))

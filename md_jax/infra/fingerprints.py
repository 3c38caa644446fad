"""Checksums of what a checkpoint holds, so a restore can tell that it read back what was saved.

Orbax's OCDBT b-tree nodes carry CRC-32C checksums, but the array chunks do not: one flipped byte
in a chunk file restores different numbers without a word. So every save records, per array, two
32-bit sums over the array's bits (plain, and weighted by each element's odd-numbered position, so
moved elements count too) and restore recomputes them. One changed element always changes the
plain sum (a difference below 2^32 is never 0 modulo 2^32). Sums modulo 2^32 do not depend on the
order in which shards are added, so the fingerprint is computed where the array lives (each device
sums its shards; only the 8 bytes per array reach the host), and a checkpoint written on one mesh
verifies on another. The host version (numpy, for trees read to the host) computes the same
numbers.

The device sums are one small jitted program per array shape, dtype and sharding, not one over the
whole tree: a state repeats few shapes (params, EMA and both Adam moments alike; every stage's UNet
the same ones), so each program is compiled once and reused by every state that holds it, where a
program over the tree was compiled anew for every state (BENCHMARKS.md, 'The test suite').
"""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def path_keys(path) -> tuple[str, ...]:
  """A tree path as plain strings, alike for dataclass fields, dict keys and sequence indices: a
  saved state and the nested dicts it reads back as compare equal."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def key(path) -> str:
  """A tree path as `a/b/c`."""
  return "/".join(path_keys(path))


@jax.jit
def _device_sums(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize not in _UNSIGNED:
    raise TypeError(f"no fingerprint for dtype {x.dtype}")
  bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
  position = jnp.zeros(x.shape, jnp.uint32)  # the row-major flat index, built without a reshape
  stride = 1
  for axis in reversed(range(x.ndim)):
    position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride)
    stride = (stride * x.shape[axis]) % 2**32
  weighted = bits * (2 * position + 1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


def of_device_tree(tree) -> dict[str, list[int]]:
  """{path: [sum, weighted sum]} of every array of a (sharded) tree, computed on its devices."""
  # Each array's sums are fetched before the next array's are dispatched: XLA:CPU's emulated
  # devices (the tests' 8) deadlock their all-reduce rendezvous with hundreds of collective
  # programs in flight at once, and the 8 bytes per array cost no more to fetch one by one.
  return {
    key(p): [int(s) for s in jax.device_get(_device_sums(x))]
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _host_sums(x) -> list[int]:
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  if x.dtype.itemsize not in _UNSIGNED:
    raise TypeError(f"no fingerprint for dtype {x.dtype}")
  bits = x.reshape(-1).view(_UNSIGNED[x.dtype.itemsize]).astype(np.uint32)
  position = np.arange(bits.size, dtype=np.uint32)
  with np.errstate(over="ignore"):  # wrapping modulo 2^32 is the definition
    weighted = bits * (np.uint32(2) * position + np.uint32(1))
  return [int(bits.sum(dtype=np.uint32)), int(weighted.sum(dtype=np.uint32))]


def of_host_tree(tree) -> dict[str, list[int]]:
  """The same fingerprints for a tree of host (numpy) arrays."""
  return {key(p): _host_sums(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def of_json(value) -> str:
  """A digest of a JSON item (the data position, the config) as it reads back."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def differences(saved: dict, found: dict) -> list[str]:
  """Paths whose fingerprint differs, or that only one side has."""
  return sorted(k for k in saved.keys() | found.keys() if saved.get(k) != found.get(k))

"""Executables kept for the life of the process, found again by the program they run.

Every run builds its own step and init functions, so JAX's in-memory caches, keyed by function
object, never carry from one run to the next; the persistent compilation cache does, but it is
keyed by the lowered module, so each run still lowers its programs, and loading an executable
back costs about as much again (~1.5 s each for the tests' tiny step on XLA:CPU). Here a run that
traces a program equal to one that an earlier run in this process compiled takes that executable:
the test suite's many tiny runs, a notebook training one config after another.

Equality is decided on what was traced, never on the config that produced it: the jaxpr's text,
the bytes of its constants, the shardings in and out, what is donated and JAX's flags. A changed
weight file, flag or config value can only make a program miss, never reuse a wrong one. The
jaxpr's text is exact for this: it holds every equation with its shapes, dtypes and parameters;
what it prints by address (a custom rule's Python function, a callback) differs from run to run,
so such a program simply never matches.
"""

import collections
import hashlib
import threading

import jax
import jax.extend
import numpy as np

# Enough for the phases of a few runs of a stage (one step per resolution and batch size, one
# init); old ones are dropped first, so a long process of many stages holds a bounded number.
MAX_PROGRAMS = 16

_lock = threading.Lock()
_programs: collections.OrderedDict = collections.OrderedDict()


def compiled(fun, args: tuple, **jit_options):
  """`jax.jit(fun, **jit_options)` compiled for `args` (arrays or `jax.ShapeDtypeStruct`s): the
  executable an equal program compiled earlier in this process got, or a new one (through the
  persistent compilation cache as usual). Call it with arguments like `args`."""
  traced = jax.jit(fun, **jit_options).trace(*args)
  key = _program_key(traced, jit_options)
  with _lock:
    kept = _programs.get(key)
    if kept is not None:
      _programs.move_to_end(key)
  if kept is None:
    kept = traced.lower().compile()
    with _lock:
      _programs[key] = kept
      while len(_programs) > MAX_PROGRAMS:
        _programs.popitem(last=False)
    return kept
  if kept.in_tree == traced.in_tree and kept.out_tree == traced.out_tree:
    return kept
  return _Rebound(kept, traced.out_tree)


class _Rebound:
  """A kept executable called with this caller's trees: the same leaves in the same order, but
  static fields of their own (a `TrainState`'s optimizer is another object in every run)."""

  def __init__(self, executable, out_tree):
    self._executable = executable
    self._out_tree = out_tree

  def __call__(self, *args):
    args, kwargs = jax.tree.unflatten(self._executable.in_tree, jax.tree.leaves(args))
    outputs = self._executable(*args, **kwargs)
    return jax.tree.unflatten(self._out_tree, jax.tree.leaves(outputs))


def clear() -> None:
  """Forgets every kept executable (their memory goes once nothing else holds them)."""
  with _lock:
    _programs.clear()


def _program_key(traced, jit_options: dict) -> tuple:
  digest = hashlib.sha256(str(traced.jaxpr).encode())
  _hash_values(traced.jaxpr, digest)
  # Shardings compare equal only on the same devices, which the jaxpr's text does not print.
  # Only the leaves: trees differ between runs in static fields alone (the optimizer object),
  # and the jaxpr already fixes the flat signature they map to.
  options = tuple(
    (name, tuple(jax.tree.leaves(value, is_leaf=lambda x: x is None)))
    for name, value in sorted(jit_options.items())
  )
  flags = tuple(sorted((name, repr(value)) for name, value in jax.config.values.items()))
  return digest.hexdigest(), options, flags


def _hash_values(jaxpr, digest) -> None:
  """Adds what the text leaves out: every array a (sub-)jaxpr holds, as constants, literals or
  equation parameters, by its bytes."""
  if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
    for const in jaxpr.consts:
      _hash_array(const, digest)
    jaxpr = jaxpr.jaxpr
  for eqn in jaxpr.eqns:
    for var in eqn.invars:
      if isinstance(var, jax.extend.core.Literal):
        _hash_array(var.val, digest)
    for value in eqn.params.values():
      _hash_param(value, digest)


def _hash_param(value, digest) -> None:
  if isinstance(value, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
    _hash_values(value, digest)
  elif isinstance(value, (np.ndarray, jax.Array)):
    _hash_array(value, digest)
  elif isinstance(value, (tuple, list)):
    for item in value:
      _hash_param(item, digest)


def _hash_array(value, digest) -> None:
  value = np.asarray(jax.device_get(value))
  digest.update(f"{value.dtype}{value.shape}".encode())
  digest.update(np.ascontiguousarray(value).tobytes())

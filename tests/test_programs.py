"""Executables kept across runs (`infra/programs.py`): an equal program is reused, anything that
changes what runs (a constant's values, a literal, the devices, a flag) is compiled anew."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from md_jax.infra import programs


@pytest.fixture(autouse=True)
def _empty():
  programs.clear()
  yield
  programs.clear()


def _kept():
  return len(programs._programs)


def _matmul_with(weights):
  return lambda x: jnp.tanh(x @ weights)


def test_equal_programs_from_different_functions_share_one_executable():
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
  weights = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)
  first = programs.compiled(_matmul_with(weights), (x,))
  second = programs.compiled(_matmul_with(weights.copy()), (x,))  # another function, equal bytes
  assert second is first and _kept() == 1
  np.testing.assert_array_equal(second(x), jax.jit(_matmul_with(weights))(x))


def test_other_constants_or_literals_compile_their_own_program():
  x = np.ones((3, 4), np.float32)
  weights = np.ones((4, 2), np.float32)
  other = weights.copy()
  other[2, 1] = 2.0  # one element: same shapes, same text
  a = programs.compiled(_matmul_with(weights), (x,))
  b = programs.compiled(_matmul_with(other), (x,))
  assert b is not a and _kept() == 2
  np.testing.assert_array_equal(b(x), jax.jit(_matmul_with(other))(x))
  np.testing.assert_array_equal(a(x), jax.jit(_matmul_with(weights))(x))
  # A scalar literal inside the program (not a constant array).
  times_two = programs.compiled(lambda v: v * 2.0, (x,))
  times_three = programs.compiled(lambda v: v * 3.0, (x,))
  assert times_three is not times_two
  np.testing.assert_array_equal(times_three(x), x * 3.0)


def test_other_devices_or_shardings_compile_their_own_program():
  x = np.ones((8, 4), np.float32)
  devices = jax.devices()

  def split_over(some):
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((len(some),), ("data",), devices=some, axis_types=auto)
    return NamedSharding(mesh, PartitionSpec("data"))

  sharded, first_four, last_four = map(split_over, (devices, devices[:4], devices[4:]))
  double = lambda v: v * 2
  executables = [
    programs.compiled(double, (x,), in_shardings=s, out_shardings=s)
    for s in (sharded, first_four, last_four)
  ]
  assert len({id(e) for e in executables}) == 3
  out = executables[2](jax.device_put(x, last_four))
  assert out.sharding == last_four


def test_a_jax_flag_is_part_of_the_program():
  x = np.ones((2, 2), np.float32)
  square = lambda v: v @ v
  default = programs.compiled(square, (x,))
  with jax.default_matmul_precision("highest"):
    highest = programs.compiled(square, (x,))
  assert highest is not default


class _State(flax.struct.PyTreeNode):
  value: jax.Array
  scale: object = flax.struct.field(pytree_node=False)  # like a TrainState's optimizer


class _Scale:
  """A static field whose instances never compare equal: each run's own optimizer object."""

  def __init__(self, factor):
    self.factor = factor


def test_a_state_with_another_static_field_runs_the_kept_program_and_keeps_its_own_fields():
  def step(state, x):
    return state.replace(value=state.value * state.scale.factor + x), {"sum": jnp.sum(x)}

  x = np.ones((2,), np.float32)
  first_state = _State(jnp.ones(2), _Scale(3.0))
  first = programs.compiled(step, (first_state, x), donate_argnums=0)
  second_state = _State(jnp.full(2, 2.0, jnp.float32), _Scale(3.0))
  second = programs.compiled(step, (second_state, x), donate_argnums=0)
  assert _kept() == 1 and second is not first  # the kept executable, under this caller's trees
  new_state, metrics = second(second_state, x)
  assert new_state.scale is second_state.scale
  np.testing.assert_array_equal(new_state.value, [7.0, 7.0])
  assert float(metrics["sum"]) == 2.0
  # A different static value traces another program.
  programs.compiled(step, (_State(jnp.ones(2), _Scale(5.0)), x), donate_argnums=0)
  assert _kept() == 2


def test_the_oldest_programs_are_dropped_beyond_the_limit(monkeypatch):
  monkeypatch.setattr(programs, "MAX_PROGRAMS", 2)
  x = np.ones((2,), np.float32)
  first = programs.compiled(lambda v: v + 1.0, (x,))
  programs.compiled(lambda v: v + 2.0, (x,))
  programs.compiled(lambda v: v + 3.0, (x,))
  assert _kept() == 2
  assert programs.compiled(lambda v: v + 1.0, (x,)) is not first

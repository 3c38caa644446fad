"""The jaxpr FLOP counter the train-step benchmark's MFU rests on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from md_jax.benchmarks.model_flops import model_flops


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_matmul_and_its_gradient():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  assert model_flops(lambda x, w: x @ w, x, w) == 2 * 4 * 8 * 16
  # The backward pass of a matmul is two more matmuls of the same size.
  loss = lambda w: jnp.sum(jnp.tanh(x @ w))
  assert model_flops(jax.value_and_grad(loss), w) == 2 * 2 * 4 * 8 * 16


def test_batched_einsum_counts_batch_dimensions():
  q, k = jnp.ones((2, 3, 5, 7)), jnp.ones((2, 3, 11, 7))
  scores = lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)
  assert model_flops(scores, q, k) == 2 * 7 * (2 * 3 * 5 * 11)


@pytest.mark.parametrize("groups", [1, 4])
def test_convolution_matches_xla_without_padding(groups):
  x = jnp.ones((2, 9, 9, 8))
  conv = nn.Conv(16, (3, 3), padding="VALID", feature_group_count=groups)
  params = conv.init(jax.random.key(0), x)
  fn = lambda p, x: conv.apply(p, x)
  counted = model_flops(fn, params, x)
  assert counted == 2 * (8 // groups) * 9 * (2 * 7 * 7 * 16)
  # XLA also counts the bias add (one FLOP per output element).
  assert counted == pytest.approx(_xla_flops(fn, params, x) - 2 * 7 * 7 * 16, rel=1e-6)


def test_scan_multiplies_by_its_length_and_remat_is_walked_into():
  w = jnp.ones((8, 8))

  def body(x, _):
    return jax.checkpoint(lambda x: jnp.tanh(x @ w))(x), None

  fn = lambda x: jax.lax.scan(body, x, None, length=5)[0]
  assert model_flops(fn, jnp.ones((4, 8))) == 5 * 2 * 4 * 8 * 8


def test_while_loop_is_refused():
  step = lambda c: (c[0] + 1, c[1] @ c[1])
  fn = lambda x: jax.lax.while_loop(lambda c: c[0] < 3, step, (0, x))
  with pytest.raises(ValueError, match="while loop"):
    model_flops(fn, jnp.ones((4, 4)))

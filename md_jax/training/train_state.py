"""The train state every stage's step function takes and returns."""

from typing import Any

import flax.struct
import jax
import optax


class TrainState(flax.struct.PyTreeNode):
  """Params, optimizer state, an EMA of the params, the step and the run's base RNG.

  The RNG is raw key data (uint32), which Orbax saves like any array; a step draws its randomness
  from `jax.random.fold_in(rng, step)`, so a resumed run draws exactly what it would have drawn.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.9999)

  @classmethod
  def create(cls, *, params, tx, rng, ema_decay: float = 0.9999):
    # `params` may hold LogicallyPartitioned boxes: the optimizer and EMA states built from them
    # carry the same logical axes, so one eval_shape of this function shards everything.
    return cls(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(lambda p: p, params),
      rng=rng,
      tx=tx,
      ema_decay=ema_decay,
    )

  def step_rng(self, *names: int):
    """A key for this step (and optionally a sub-purpose), never reused across steps."""
    key = jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
    for name in names:
      key = jax.random.fold_in(key, name)
    return key

  def apply_gradients(self, grads):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    decay = self.ema_decay
    ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, self.ema_params, params)
    return self.replace(
      step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
    )

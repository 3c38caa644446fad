"""`md_jax.benchmarks.block_rate` times the UNet's own blocks, at its train-step configs' shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from md_jax.benchmarks import block_rate, train_step
from md_jax.models.unet import UNet


def _param_shapes(module, *inputs):
  variables = jax.eval_shape(module.init, jax.random.key(0), *inputs)
  return jax.tree.map(lambda a: a.shape, nn.meta.unbox(variables["params"]))


def test_mid_blocks_are_the_unets_own_at_its_shapes(parsed_flags):
  config, batch, resolution = train_step.size_config("mid")
  unet = UNet.from_config(config.model)
  side = resolution // config.latents.downsample
  unet_params = _param_shapes(
    unet,
    jnp.zeros((batch, side, side, config.model.in_channels)),
    jnp.zeros((batch,), jnp.int32),
    jnp.zeros((batch, config.model.text_length, config.model.text_dim)),
  )
  timed = {
    name: (_param_shapes(module, jnp.zeros(shape), jnp.zeros(other)), shape)
    for name, module, shape, other in block_rate.blocks("mid")
  }
  assert list(timed) == [
    "level 0 resnet",
    "level 1 separable",
    "level 1 transformer (cross)",
    "level 2 separable",
    "level 2 transformer (self+cross)",
  ]
  # Each timed block has the parameters of one the UNet runs at that level (the level-1
  # separable block exists only with a wider input there: after a downsample or a skip).
  assert timed["level 0 resnet"] == (unet_params["down_0"]["block_0"], (8, 16, 16, 64))
  assert timed["level 2 separable"] == (unet_params["innermost"]["mid_block_0"], (8, 4, 4, 192))
  transformer = unet_params["down_1"]["transformer_0"]
  assert timed["level 1 transformer (cross)"] == (transformer, (8, 8, 8, 128))
  # The middle stack is 9 such layers deep; the timed one is its first.
  middle, shape = timed["level 2 transformer (self+cross)"]
  model_middle = unet_params["innermost"]["mid_transformer"]
  assert shape == (8, 4, 4, 192) and middle == {k: model_middle[k] for k in middle}
  assert set(model_middle) - set(middle) == {f"layer_{i}" for i in range(1, 9)}

r"""What the train-step ratio is made of: each UNet level's blocks alone, over the matmul.

    python -m md_jax.benchmarks.block_rate [--sizes=tiny,mid,quarter] [--repeats=15]

`python -m md_jax.benchmarks.train_step` divides a whole step's FLOP/s by a large matmul's. Nearly
all of a UNet step's FLOPs are in its levels' conv blocks and transformer layers, so the rate each
reaches by itself, forward and backward, at the width, block type, map size and batch of each
level of the step benchmark's configs, says what the step can reach: a step whose blocks all run
below 0.5 of the matmul alone is not expected above 0.5, since it runs those blocks and adds the
optimizer, the text and image encoders and the input path to them.

The levels are read from `train_step.size_config`, so they are that benchmark's configs. Each
block is the model's own with random weights: the level's conv block (`ResBlock` or
`SeparableBlock`: convolutions, GroupNorm, swish, the timestep projection) and, at levels whose
layout has transformers, one `SpatialTransformer` layer (GroupNorm, projections, attention to the
77 text tokens and, innermost, self-attention, the gated feed-forward). FLOPs are `model_flops`'
count of the jitted gradient, as the step benchmark counts; each block's calls are interleaved
with the square matmul, whose median over the whole run is the reference. Last line: one JSON
object.
"""

import json
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from md_jax.benchmarks import model_flops, timing, train_step
from md_jax.models.unet import UNet

# Its flags are train_step's (this module imports it): `--sizes`, `--batch`, `--dtype`,
# `--matmul_size`, and `--repeats` timed calls per block, each interleaved with the matmul.
FLAGS = flags.FLAGS


def blocks(size: str):
  """(name, module, input shape, second input's shape) for each level of `train_step`'s config
  `size`, at its batch and resolution: the level's conv block (its second input the time
  embedding) and, where the layout puts transformers, one transformer layer (the text; with
  self-attention where any of that level's has it). Built by the UNet's own `block_options`."""
  config, batch, resolution = train_step.size_config(size, FLAGS.dtype)
  unet = UNet.from_config(config.model)
  time_embedding = (batch, unet.time_embed_dim or 4 * unet.channels[0])
  for level, width in enumerate(unet.channels):
    options = unet.block_options(level)
    side = resolution // config.latents.downsample // 2**level
    shape = (batch, side, side, width)
    block_type = unet.block_types[level]
    block = options.conv_block(block_type, width, "block")
    yield f"level {level} {block_type}", block, shape, time_embedding
    depths = [*unet.down_transformer_depths[level], *unet.up_transformer_depths[level]]
    self_attention = [*unet.down_self_attention[level], *unet.up_self_attention[level]]
    if level == len(unet.channels) - 1:  # the innermost level also holds the middle stack
      depths.append(unet.mid_transformer_depth)
      self_attention.append(unet.mid_self_attention)
    if any(depths):
      with_self = any(s for d, s in zip(depths, self_attention) if d)
      layer = options.transformer(1, with_self, "transformer")
      name = f"level {level} transformer ({'self+cross' if with_self else 'cross'})"
      yield name, layer, shape, (batch, unet.text_length, unet.text_dim)


def block_step(module: nn.Module, shape: tuple, other_shape: tuple):
  """(thunk running the block's jitted forward + backward once, its model FLOPs)."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], shape, module.dtype)
  other = jax.random.normal(keys[1], other_shape, module.dtype)
  params = nn.meta.unbox(module.init(keys[2], x, other))

  def loss(params, x):
    return jnp.sum(jnp.square(module.apply(params, x, other).astype(jnp.float32)))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  flops = model_flops.model_flops(step, params, x)
  jax.block_until_ready(step(params, x))
  return (lambda: jax.block_until_ready(step(params, x))), flops


def main(argv):
  del argv
  side = FLAGS.matmul_size
  a = jax.random.normal(jax.random.key(1), (side, side), jnp.dtype(FLAGS.dtype))
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, a))
  timings = []  # (size, name, shape, FLOPs, median seconds)
  matmul_times = []
  for size in FLAGS.sizes:
    for name, module, shape, other_shape in blocks(size):
      run, flops = block_step(module, shape, other_shape)
      around, block_times = timing.interleaved_times(
        FLAGS.repeats, lambda: jax.block_until_ready(matmul(a, a)), run
      )
      matmul_times += around
      timings.append((size, name, shape, flops, statistics.median(block_times)))
  # One reference for every block, the median over the whole run, as train_step's: a matmul
  # timed during one block's few calls is as noisy as the block.
  matmul_rate = 2 * side**3 / statistics.median(matmul_times)
  result = {
    **timing.machine(), "dtype": FLAGS.dtype,
    "matmul_gflops_per_s": round(matmul_rate / 1e9, 1), "blocks": [],
  }  # fmt: skip
  for size, name, shape, flops, seconds in timings:
    rate = flops / seconds
    result["blocks"].append({
      "size": size, "block": name, "shape": list(shape), "mflops": round(flops / 1e6, 1),
      "gflops_per_s": round(rate / 1e9, 1), "ratio_to_matmul": round(rate / matmul_rate, 3),
    })  # fmt: skip
    print(
      f"{size} {name}, {'×'.join(map(str, shape))}: {flops / 1e6:.0f} MFLOP forward + "
      f"backward at {rate / 1e9:.1f} GFLOP/s = {rate / matmul_rate:.2f} of the "
      f"{matmul_rate / 1e9:.1f} GFLOP/s matmul"
    )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

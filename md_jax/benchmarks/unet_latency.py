r"""Latency of one UNet forward, MobileDiffusion vs SD-1.5, in one process, runs interleaved.

  python -m md_jax.benchmarks.unet_latency [--runs=5] [--latent_size=64] [--dtype=float32]

Both models are built from their configs (`configs/models/{mobilediffusion,sd15}.py`), params are
random-initialised with `jax.jit(init)` (the output layers are zero-init, which changes nothing
about the work done), and the jitted forward (batch 1, text 77×768) is compiled and run once before
timing. Timed runs alternate MD, SD, MD, SD, ... so drift in machine load hits both medians alike.
The last line is one JSON object. fp32 SD-1.5 params take 3.4 GB of host memory.
"""

import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from md_jax.benchmarks import timing
from md_jax.config_utils import load_config
from md_jax.models.unet import UNet

_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"
_MD_CONFIG = flags.DEFINE_string("md_config", str(_CONFIGS / "mobilediffusion.py"), "MD config.")
_SD_CONFIG = flags.DEFINE_string("sd_config", str(_CONFIGS / "sd15.py"), "SD-1.5 config.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed forward passes per model (interleaved).")
_LATENT_SIZE = flags.DEFINE_integer("latent_size", 64, "Latent height = width (64 = 512 px).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def build_forward(config_path: str, latent_size: int, dtype: str, seed: int = 0):
  """Returns (forward thunk that blocks until done, number of params)."""
  unet = UNet.from_config(load_config(config_path), dtype=jnp.dtype(dtype))
  k_init, k_x, k_t, k_c = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k_x, (1, latent_size, latent_size, unet.in_channels))
  t = jax.random.uniform(k_t, (1,), maxval=1000.0)
  text = jax.random.normal(k_c, (1, unet.text_length, unet.text_dim))
  variables = jax.jit(unet.init)(k_init, x, t, text)
  num_params = sum(int(v.size) for v in jax.tree.leaves(variables))
  forward = jax.jit(unet.apply)

  def run():
    return forward(variables, x, t, text).block_until_ready()

  run()  # compile + first run (allocations), not timed
  return run, num_params


def main(argv):
  del argv
  md, md_params = build_forward(_MD_CONFIG.value, _LATENT_SIZE.value, _DTYPE.value)
  sd, sd_params = build_forward(_SD_CONFIG.value, _LATENT_SIZE.value, _DTYPE.value)
  md_times, sd_times = timing.interleaved_times(_RUNS.value, md, sd)
  md_median, sd_median = statistics.median(md_times), statistics.median(sd_times)
  result = {
    **timing.machine(),
    "latent_size": _LATENT_SIZE.value,
    "dtype": _DTYPE.value,
    "batch": 1,
    "runs": _RUNS.value,
    "md_params": md_params,
    "sd_params": sd_params,
    "md_median_s": md_median,
    "sd_median_s": sd_median,
    "ratio": md_median / sd_median,
    "md_times_s": md_times,
    "sd_times_s": sd_times,
  }
  print(f"MobileDiffusion UNet forward: median {md_median * 1e3:.1f} ms over {_RUNS.value} runs")
  print(f"SD-1.5 UNet forward:          median {sd_median * 1e3:.1f} ms over {_RUNS.value} runs")
  print(f"ratio MD / SD: {md_median / sd_median:.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

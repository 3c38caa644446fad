r"""Latency of the full vs the lightweight VAE decoder (paper Table 4), interleaved in one process.

  python -m md_jax.benchmarks.decoder_latency [--runs=5] [--latent_size=64] \
      [--vae_checkpoint=workdirs/vae_tiny --light_checkpoint=workdirs/light_tiny]

Both decoders come from `configs/models/vae.py` (`decoder` and `light_decoder`), random-initialised
(latency does not depend on the weights), batch 1, a 64×64×8 latent → 512×512×3 image. Each is
compiled and run once, then timed runs alternate full, light, full, light, ... so drift in machine
load hits both medians alike; XLA's FLOP count of each compiled decoder is printed beside them.
With the two checkpoints (a `vae` run and the `decoder_distill` run made from it), the PSNR of each
on held-out `shapes` images is measured too. The last line is one JSON object.
"""

import json
import pathlib
import statistics

import jax
from absl import app, flags

from md_jax.benchmarks import timing
from md_jax.config_utils import load_config
from md_jax.models import vae

_CONFIG = flags.DEFINE_string(
  "config",
  str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "models" / "vae.py"),
  "VAE model config (`decoder` and `light_decoder`).",
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed decodes per decoder (interleaved).")
_LATENT_SIZE = flags.DEFINE_integer("latent_size", 64, "Latent height = width (64 → 512 px).")
_VAE_CHECKPOINT = flags.DEFINE_string("vae_checkpoint", None, "A vae run, for the PSNR figures.")
_LIGHT_CHECKPOINT = flags.DEFINE_string("light_checkpoint", None, "Its decoder_distill run.")


def build_decode(decoder: vae.Decoder, latent_shape, seed: int = 0):
  """(thunk that decodes once and blocks, params count, XLA FLOPs of one decode)."""
  k_init, k_z = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(k_z, latent_shape)
  params = jax.jit(decoder.init)(k_init, z)
  forward = jax.jit(decoder.apply)
  flops = forward.lower(params, z).compile().cost_analysis().get("flops", float("nan"))

  def run():
    return forward(params, z).block_until_ready()

  run()  # compile + first run (allocations), not timed
  return run, sum(int(v.size) for v in jax.tree.leaves(params)), float(flops)


def main(argv):
  del argv
  model = load_config(_CONFIG.value)
  shape = (1, _LATENT_SIZE.value, _LATENT_SIZE.value, model.latent_channels)
  full, full_params, full_flops = build_decode(vae.decoder_from_config(model.decoder, model), shape)
  light, light_params, light_flops = build_decode(
    vae.decoder_from_config(model.light_decoder, model), shape
  )
  full_times, light_times = timing.interleaved_times(_RUNS.value, full, light)
  full_median, light_median = statistics.median(full_times), statistics.median(light_times)
  result = {
    **timing.machine(),
    "output_px": _LATENT_SIZE.value * vae.downsample_factor(model),
    "runs": _RUNS.value,
    "full_params": full_params,
    "light_params": light_params,
    "full_gflops": full_flops / 1e9,
    "light_gflops": light_flops / 1e9,
    "full_median_s": full_median,
    "light_median_s": light_median,
    "light_over_full": light_median / full_median,
    "speedup": full_median / light_median,
  }
  if _VAE_CHECKPOINT.value and _LIGHT_CHECKPOINT.value:
    from md_jax.evaluation import vae_eval

    kw = {"split": "validation", "num_images": 512, "batch_size": 32}
    full_psnr = vae_eval.evaluate(_VAE_CHECKPOINT.value, **kw)["psnr_db"]
    light_psnr = vae_eval.evaluate(_LIGHT_CHECKPOINT.value, **kw)["psnr_db"]
    result.update(
      full_psnr_db=full_psnr, light_psnr_db=light_psnr, psnr_drop_db=full_psnr - light_psnr
    )
  print(
    f"full decoder {full_median * 1e3:.0f} ms ({full_flops / 1e9:.0f} GFLOPs), light "
    f"{light_median * 1e3:.0f} ms ({light_flops / 1e9:.0f} GFLOPs): {result['speedup']:.2f}× faster"
  )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

r"""Text-to-image latency: the one-step pipeline against 50-step DDIM with CFG, in one process.

  python -m md_jax.benchmarks.pipeline_latency [--runs=3] [--resolution=512] [--steps=50] \
      [--config=configs/mobilediffusion.py]

Both pipelines are `TextToImage.generate`, the program `md_jax.generate` runs, compiled whole:
text encoder → UNet → light VAE decoder, batch 1. One-step (UFOGen, paper Sec. 4): one UNet call.
DDIM: `--steps` steps, each one UNet call on the conditional and unconditional halves of a batch
of 2 (classifier-free guidance, scale 3). Models come from the config (the paper's 386M UNet, a
CLIP ViT-L/14-sized text encoder, the f=8 c=8 VAE's light decoder), random-initialised: latency
does not depend on the weights. Each pipeline runs once untimed (compile); then timed runs
alternate one-step, DDIM, one-step, ... so drift in machine load hits both medians alike. The
paper's figures (iPhone 15 Pro, 512 px): 238 ms one-step vs 7429 ms for SD-1.5's 20 steps.
The last line is one JSON object.
"""

import json
import pathlib
import statistics

import flax.linen as nn
import jax
from absl import app, flags

from md_jax.benchmarks import timing
from md_jax.config_utils import load_config

_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def define_flags():
  flags.DEFINE_string("config", str(_CONFIGS / "mobilediffusion.py"), "Diffusion stage config.")
  flags.DEFINE_string("vae_config", str(_CONFIGS / "models" / "vae.py"), "VAE model config.")
  flags.DEFINE_integer("resolution", 512, "Output height = width in pixels.")
  flags.DEFINE_integer("steps", 50, "DDIM steps of the multi-step pipeline.")
  flags.DEFINE_float("cfg", 3.0, "Guidance scale of the multi-step pipeline.")
  flags.DEFINE_integer("runs", 3, "Timed runs per pipeline (interleaved).")


def build_pipelines(config, vae_model, resolution: int, steps: int, cfg: float, seed: int = 0):
  """({name: thunk that generates one image and blocks}, info) for one-step and DDIM."""
  from md_jax.pipeline.text_to_image import TextToImage

  model = TextToImage.untrained(config, vae_model)
  key, init_key = jax.random.split(jax.random.key(seed))
  params = nn.meta.unbox(jax.jit(model.init_params)(jax.random.split(init_key, 3)))
  tokens = model.tokenize(["a photo of a red fox"])

  def timed(sampler, num_steps, scale):
    def run():
      out = model.generate(
        params, tokens, seed=key, resolution=resolution, sampler=sampler, steps=num_steps,
        cfg=scale,
      )  # fmt: skip
      return out.block_until_ready()

    run()  # compile and first run: not timed
    return run

  pipelines = {"one_step": timed("ufogen", 1, 1.0), "ddim": timed("ddim", steps, cfg)}
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  info = {"unet_params": count(params.unet), "text_encoder_params": count(params.text_encoder)}
  return pipelines, info


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = load_config(FLAGS.config)
  vae_model = load_config(FLAGS.vae_config)
  pipelines, info = build_pipelines(config, vae_model, FLAGS.resolution, FLAGS.steps, FLAGS.cfg)
  one_step_times, ddim_times = timing.interleaved_times(
    FLAGS.runs, pipelines["one_step"], pipelines["ddim"]
  )
  one_step, ddim = statistics.median(one_step_times), statistics.median(ddim_times)
  result = {
    **timing.machine(),
    "config": pathlib.Path(FLAGS.config).name,
    "resolution": FLAGS.resolution,
    "ddim_steps": FLAGS.steps,
    "cfg": FLAGS.cfg,
    "runs": FLAGS.runs,
    **info,
    "one_step_median_s": one_step,
    "ddim_median_s": ddim,
    "one_step_over_ddim": one_step / ddim,
    "speedup": ddim / one_step,
    "paper_one_step_over_sd20": 238 / 7429,
  }
  print(
    f"one-step {one_step:.2f} s vs {FLAGS.steps}-step DDIM + CFG {ddim:.2f} s at "
    f"{FLAGS.resolution} px: {result['speedup']:.1f}× faster (paper: 238 ms vs 7429 ms)"
  )
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

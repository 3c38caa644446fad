r"""Text-to-image latency: the one-step pipeline against 50-step DDIM with CFG, in one process.

  python -m md_jax.benchmarks.pipeline_latency [--runs=3] [--resolution=512] [--steps=50] \
      [--config=configs/mobilediffusion.py]

Both pipelines are `DiffusionStage.generate`, the program `md_jax.generate` runs, compiled whole:
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
import jax.numpy as jnp
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
  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.models import vae
  from md_jax.training.diffusion import DiffusionStage
  from md_jax.training.latent_space import LatentSpace

  autoencoder = vae.autoencoder_from_config(vae_model, light=True)
  f = vae.downsample_factor(vae_model)
  stage = DiffusionStage(config, latent_space=LatentSpace(autoencoder, None, 1.0, f))
  keys = jax.random.split(jax.random.key(seed), 4)
  latents = jnp.zeros((1, *stage.latent_shape(resolution)))
  tokens = jnp.asarray(tokenizer_lib.tokenize(stage.tokenizer, ["a photo of a red fox"]))
  text = jnp.zeros((1, tokens.shape[1], config.model.text_dim))
  t = jnp.zeros((1,), jnp.int32)
  unet = nn.meta.unbox(jax.jit(stage.unet.init)(keys[0], latents, t, text)["params"])
  text_params = nn.meta.unbox(jax.jit(stage.text_encoder.init)(keys[1], tokens)["params"])
  image = jnp.zeros((1, resolution, resolution, 3))
  ae_params = nn.meta.unbox(jax.jit(autoencoder.init)(keys[2], image)["params"])

  def pipeline(sampler, num_steps, scale):
    def run():
      out = stage.generate(
        unet, text_params, ae_params, tokens, keys[3], resolution=resolution, sampler=sampler,
        steps=num_steps, cfg=scale,
      )  # fmt: skip
      return out.block_until_ready()

    run()  # compile and first run: not timed
    return run

  pipelines = {"one_step": pipeline("ufogen", 1, 1.0), "ddim": pipeline("ddim", steps, cfg)}
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  info = {"unet_params": count(unet), "text_encoder_params": count(text_params)}
  return pipelines, info


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  config = load_config(FLAGS.config)
  vae_model = load_config(FLAGS.vae_config)
  config.model.in_channels = config.model.out_channels = vae_model.latent_channels
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

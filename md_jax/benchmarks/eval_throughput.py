r"""Evaluation throughput: images/s of generation + FID features + CLIP score, per device, for the
full-size model at 512 px — what sizes an FID-30K run (`md_jax.evaluation.t2i_eval`).

  python -m md_jax.benchmarks.eval_throughput [--sampler=ufogen --steps=1] [--per_device=1] \
      [--clip=vit_g_14|vit_l_14|none] [--runs=3]

One batch of `--per_device` images on every device, through the pieces the evaluator runs on
each chunk: `TextToImage.generate` (the paper's 386M UNet, CLIP ViT-L/14-sized text encoder, the
light VAE decoder), the FID InceptionV3 behind clean-fid's resize, and CLIP (OpenCLIP ViT-g/14's
layout by default, as the paper scores). Random weights: the cost does not depend on them. Each
part compiles untimed, then the three are timed in turn, `--runs` times; medians. The last line
is one JSON object.
"""

import json
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from md_jax.benchmarks import timing
from md_jax.config_utils import load_config

_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def define_flags():
  flags.DEFINE_string("config", str(_CONFIGS / "mobilediffusion.py"), "Diffusion stage config.")
  flags.DEFINE_string("vae_config", str(_CONFIGS / "models" / "vae.py"), "VAE model config.")
  flags.DEFINE_integer("resolution", 512, "Generated image size.")
  flags.DEFINE_enum("sampler", "ufogen", ["ufogen", "ddim", "dpm++"], "Sampler.")
  flags.DEFINE_integer("steps", 1, "Sampler steps.")
  flags.DEFINE_float("cfg", 3.0, "Guidance scale (ddim, dpm++).")
  flags.DEFINE_integer("per_device", 1, "Images per device in a batch.")
  flags.DEFINE_enum("clip", "vit_g_14", ["vit_g_14", "vit_l_14", "none"], "CLIP layout.")
  flags.DEFINE_integer("runs", 3, "Timed batches.")


def clip_config(name: str, vocab_size: int) -> dict | None:
  from md_jax.models.clip_vision import VIT_G_14

  if name == "none":
    return None
  if name == "vit_g_14":
    return VIT_G_14
  return {  # openai/clip-vit-large-patch14
    "projection_dim": 768,
    "text_config": {
      "vocab_size": vocab_size, "hidden_size": 768, "intermediate_size": 3072,
      "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    },
    "vision_config": {
      "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
      "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
    },
  }  # fmt: skip


def _timed(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  from md_jax.evaluation import caption_eval, clip_score, feature_networks
  from md_jax.infra import sharding
  from md_jax.pipeline.text_to_image import TextToImage

  mesh = sharding.create_mesh((-1, 1))
  rules = sharding.logical_axis_rules(None)
  batch = FLAGS.per_device * jax.device_count()
  model = TextToImage.untrained(load_config(FLAGS.config), load_config(FLAGS.vae_config))
  params = nn.meta.unbox(jax.jit(model.init_params)(jax.random.split(jax.random.key(0), 3)))
  params = caption_eval.replicate(params, mesh)
  tokens = jax.device_put(
    np.repeat(model.tokenize(["a photo of a red fox in the snow"]), batch, axis=0),
    sharding.batch_sharding(mesh, rules, 2),
  )
  inception = feature_networks.inception_features("random", mesh)
  scorer = None
  config = clip_config(FLAGS.clip, len(model.tokenizer))
  if config is not None:
    scorer = clip_score.CLIPScorer.from_config(config)
    scorer.params = caption_eval.replicate(scorer.params, mesh)

  images = None

  def generate():
    nonlocal images
    images = model.generate(
      params, tokens, seed=0, resolution=FLAGS.resolution, sampler=FLAGS.sampler,
      steps=FLAGS.steps, cfg=FLAGS.cfg,
    )  # fmt: skip
    return images

  parts = {"generate": generate, "inception": lambda: inception(images)}
  if scorer is not None:
    parts["clip"] = lambda: scorer.score(images, tokens)
  for fn in parts.values():  # compile, untimed
    jax.block_until_ready(fn())
  times = {name: [] for name in parts}
  for _ in range(FLAGS.runs):
    for name, fn in parts.items():
      times[name].append(_timed(fn))
  seconds = {name: statistics.median(t) for name, t in times.items()}
  total = sum(seconds.values())
  result = {
    **timing.machine(),
    "devices": jax.device_count(),
    "batch": batch,
    "resolution": FLAGS.resolution,
    "sampler": FLAGS.sampler,
    "steps": FLAGS.steps,
    "clip": FLAGS.clip,
    "runs": FLAGS.runs,
    **{f"{name}_s_per_batch": s for name, s in seconds.items()},
    "images_per_s": batch / total,
    "images_per_s_per_device": batch / total / jax.device_count(),
    "fid_30k_hours": 30000 / (batch / total) / 3600,
  }
  shares = ", ".join(f"{n} {s / total:.0%}" for n, s in seconds.items())
  print(
    f"{batch} images ({FLAGS.sampler} × {FLAGS.steps}, {FLAGS.resolution} px) on "
    f"{jax.device_count()} device(s): {result['images_per_s']:.3f} images/s "
    f"({result['images_per_s_per_device']:.3f} per device; {shares}); FID-30K ≈ "
    f"{result['fid_30k_hours']:.1f} h"
  )
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

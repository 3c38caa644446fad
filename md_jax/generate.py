r"""Text → images from a trained checkpoint.

  python -m md_jax.generate --workdir=workdirs/diffusion_tiny \
      --prompt "a large red circle on a white background" --prompt "..." \
      [--sampler=ddim|dpm++|ufogen] [--steps=50] [--cfg=3.0] [--eta=0] [--seed=0] \
      [--resolution=64] [--out=DIR] \
      [--latent_classifier=RUN --classifier_scale=30] \
      [--lora=concept.safetensors[:1.0] --lora=style.safetensors:0.5] \
      [--plugin=PLUGIN_RUN --control_image=edges_from.png] [--image=photo.png --mask=mask.png]

`--checkpoint` takes one checkpoint directory instead of a workdir's latest. The model (UNet, text
encoder, latent space: a `decoder_distill` run's light decoder when the diffusion stage was trained
on it) is rebuilt from the config saved in the checkpoint and run with the EMA params. Writes
`grid.png` and `NN.png` per image to `--out` (default `<workdir>/generated`), each with the prompt
and the settings in its PNG metadata. A prompt longer than the text encoder's 77 tokens is
truncated, with a warning. `--latent_classifier` adds classifier guidance toward the attributes
each prompt names; the prompts must then follow the `shapes` caption grammar. `--lora` merges a
LoRA file (`pipeline/lora_file.py`) into the UNet at a scale (default 1; repeat for several);
`--plugin` adds a control plugin run's adapter (`pipeline/control.py`), its condition made from
`--control_image` as the input pipeline makes it (resized to the sampling resolution), the same
for every prompt. `--image` with `--mask` inpaints: the mask's white region is repainted, the rest
kept at the image's latents, without training (`pipeline/inpainting.py`). All serve every
sampler, the one-step `ufogen` one included: a LoRA or plugin trained on the diffusion run applies
to the UFOGen generator finetuned from it. A bad flag, path or checkpoint ends with one line
`FATAL <message>`, the traceback in `error.log` under `--out` or `--workdir` (`--verbose`: on
stderr; `md_jax/cli_errors.py`).
"""

import json
import math
import os
import pathlib

from absl import app, flags

from md_jax import cli_errors

FLAGS = flags.FLAGS


def generate(
  checkpoint: str, prompts, *, sampler="ddim", steps=50, cfg=3.0, eta=0.0, seed=0, resolution=None,
  latent_classifier=None, classifier_scale=0.0, loras=(), plugin=None, control_image=None,
  image=None, mask=None, dtype=None, what="--checkpoint",
):  # fmt: skip
  """(uint8 images (N, H, W, 3), settings dict) for `prompts` from a diffusion-family checkpoint;
  classifier-guided by a `latent_classifier` run when one is given (with a nonzero scale).
  `loras`: [(LoRA file, scale), ...] merged into the UNet; `plugin`: a control plugin run, its
  condition made from the image file `control_image` (both or neither); `image` and `mask`
  (both or neither): inpainting, the mask's white region repainted, the rest kept. `dtype`
  (e.g. "bfloat16"): the UNet and text encoder compute in it, their weights cast to it.
  `what`: the flag or key that named `checkpoint`, for errors."""
  import jax
  import numpy as np

  from md_jax.data.shapes_scene import caption_label_ids
  from md_jax.pipeline import lora_file
  from md_jax.pipeline.classifier_guidance import load_guide
  from md_jax.pipeline.text_to_image import TextToImage

  if (plugin is None) != (control_image is None):
    raise ValueError(
      f"--plugin={plugin!r} needs --control_image=PATH, the image its condition is made from"
      if control_image is None
      else f"--control_image={control_image!r} needs --plugin=RUN, the plugin that reads it"
    )
  if (image is None) != (mask is None):
    raise ValueError("--image and --mask go together: the image and the region to repaint")
  # The small inputs first: a bad LoRA file or image fails before a checkpoint is read.
  loaded = [(lora_file.load_lora(path), scale) for path, scale in loras]
  if control_image is not None and not os.path.isfile(control_image) and "://" not in control_image:
    raise ValueError(f"--control_image={control_image!r} does not exist")
  pipeline, params, step, _ = TextToImage.from_checkpoint(checkpoint, what=what, dtype=dtype)
  if loaded:
    params = lora_file.apply_to(params, loaded)
  if dtype is not None:
    params = pipeline.weights_in_compute_dtype(params)
  factor = pipeline.latent_space.downsample
  if resolution is not None and (resolution < 1 or resolution % factor):
    raise ValueError(
      f"--resolution={resolution}: expected a positive multiple of {factor}, the latent factor "
      f"of {what}={checkpoint!r}"
    )
  classifier_guide = load_guide(latent_classifier, pipeline, scale=classifier_scale)
  if classifier_guide is not None:  # the attributes each prompt names, read by its grammar
    classifier_guide = classifier_guide.with_labels(caption_label_ids(prompts))
  resolution = resolution or pipeline.resolution
  control = condition_kind = None
  if plugin is not None:
    from md_jax.pipeline import control as control_lib

    adapter, adapter_params, plugin_config = control_lib.load_plugin(plugin)
    condition_kind = plugin_config.plugin.condition
    condition = control_lib.condition_from_image(control_image, condition_kind, resolution)
    maps = np.broadcast_to(condition, (len(prompts), *condition.shape))
    control = (adapter, adapter_params, maps)
  inpaint = None
  if image is not None:
    from md_jax.pipeline import inpainting

    inpaint = inpainting.load_inpaint(image, mask, resolution, len(prompts))
  images = pipeline.generate(
    params, list(prompts), seed=seed, resolution=resolution, sampler=sampler, steps=steps,
    cfg=cfg, eta=eta, classifier_guide=classifier_guide, control=control, inpaint=inpaint,
  )  # fmt: skip
  settings = {
    "checkpoint": str(checkpoint),
    "step": int(step),
    "sampler": sampler,
    "steps": steps,
    "cfg": cfg,
    "eta": eta,
    "seed": seed,
    "resolution": resolution,
  }
  if dtype is not None:
    settings["dtype"] = dtype
  if classifier_guide is not None:
    settings["latent_classifier"] = str(latent_classifier)
    settings["classifier_scale"] = float(classifier_scale)
  if loaded:
    settings["loras"] = [lora_file.describe(manifest, s) for (_, manifest), s in loaded]
  if plugin is not None:
    settings.update(plugin=str(plugin), control_image=str(control_image), condition=condition_kind)
  if image is not None:
    settings.update(image=str(image), mask=str(mask))
  return jax.device_get(images), settings


def parse_lora_flag(value: str) -> tuple[str, float]:
  """`FILE[:scale]` → (FILE, scale), scale 1.0 by default. A ':' followed by no '/' starts the
  scale (so `gs://bucket/x.safetensors` is a file); a scale that is not a float is an error."""
  path, sep, tail = value.rpartition(":")
  if not sep or "/" in tail:
    return value, 1.0
  try:
    scale = float(tail)
  except ValueError:
    raise ValueError(
      f"--lora={value}: scale {tail!r} is not a float (expected FILE or FILE:SCALE)"
    ) from None
  if not path or not math.isfinite(scale):
    raise ValueError(f"--lora={value}: expected FILE or FILE:SCALE with a finite SCALE")
  return path, scale


def write_images(images, prompts, settings: dict, out: pathlib.Path) -> None:
  """`NN.png` per image and `grid.png` under `out`, the prompts and settings in their metadata."""
  from md_jax import visualize

  settings_text = json.dumps(settings)
  for i, (image, prompt) in enumerate(zip(images, prompts)):
    visualize.save_png(image, out / f"{i:02d}.png", {"prompt": prompt, "settings": settings_text})
  visualize.save_png(
    visualize.make_grid(images), out / "grid.png",
    {"prompts": json.dumps(list(prompts)), "settings": settings_text},
  )  # fmt: skip


def define_flags():
  """The command-line flags; defined only when this module runs as a program, so that importing
  it as a library next to another CLI module cannot collide on a flag name."""
  flags.DEFINE_string("workdir", None, "A training run's workdir (its latest checkpoint).")
  flags.DEFINE_string("checkpoint", None, "One checkpoint directory.")
  flags.DEFINE_multi_string("prompt", None, "A prompt; repeat for several images.")
  flags.DEFINE_enum("sampler", "ddim", ["ddim", "dpm++", "ufogen"], "Sampler.")
  flags.DEFINE_integer("steps", 50, "Network evaluations (1 for one-step UFOGen).")
  flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale (ddim, dpm++).")
  flags.DEFINE_float("eta", 0.0, "DDIM's fresh-noise share: 0 deterministic, 1 DDPM-like.")
  flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
  flags.DEFINE_integer("resolution", None, "Image size; default: the final phase's.")
  flags.DEFINE_string("out", None, "Output directory; default <workdir>/generated.")
  flags.DEFINE_string(
    "latent_classifier", None, "A latent_classifier run: classifier guidance (ddim, dpm++)."
  )
  flags.DEFINE_float("classifier_scale", 0.0, "Classifier guidance scale (0: none).")
  flags.DEFINE_multi_string(
    "lora", None, "FILE[:scale]: a LoRA .safetensors file merged at scale (default 1); repeatable."
  )
  flags.DEFINE_string("plugin", None, "A control plugin run (its workdir or a checkpoint).")
  flags.DEFINE_string(
    "control_image", None, "The image --plugin's condition is made from (resized, as in training)."
  )
  flags.DEFINE_string("image", None, "Inpainting: the image to keep outside --mask.")
  flags.DEFINE_string("mask", None, "Inpainting: the region to repaint (white), --image's size.")
  flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"],
    "The UNet's and text encoder's compute and weight dtype; default: the run's config "
    "(bfloat16 on a CPU with AMX-BF16: 0.7x float32's time for a 220M UNet, BENCHMARKS.md).",
  )  # fmt: skip
  cli_errors.define_verbose_flag()


def log_dir():
  """Where error.log goes: `--out` or `--workdir`, the first that exists (never a checkpoint's
  own directory)."""
  return [FLAGS.out, FLAGS.workdir]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  if not FLAGS.prompt:
    raise app.UsageError("give at least one --prompt")
  loras = [parse_lora_flag(value) for value in FLAGS.lora or ()]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  source = FLAGS.checkpoint or FLAGS.workdir
  images, settings = generate(
    source,
    FLAGS.prompt,
    sampler=FLAGS.sampler,
    steps=FLAGS.steps,
    cfg=FLAGS.cfg,
    eta=FLAGS.eta,
    seed=FLAGS.seed,
    resolution=FLAGS.resolution,
    latent_classifier=FLAGS.latent_classifier,
    classifier_scale=FLAGS.classifier_scale,
    loras=loras,
    plugin=FLAGS.plugin,
    control_image=FLAGS.control_image,
    image=FLAGS.image,
    mask=FLAGS.mask,
    dtype=FLAGS.dtype,
    what="--checkpoint" if FLAGS.checkpoint else "--workdir",
  )
  out = pathlib.Path(FLAGS.out or pathlib.Path(FLAGS.workdir or source) / "generated")
  write_images(images, FLAGS.prompt, settings, out)
  print(f"wrote {len(images)} images and grid.png to {out}")
  print(json.dumps({**settings, "out": str(out), "num_images": len(images)}))


if __name__ == "__main__":
  define_flags()
  cli_errors.run(main, log_dir=log_dir)

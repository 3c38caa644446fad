r"""Inpainting on `shapes`: one shape masked out and repainted from its caption, scored (issue 42).

  python -m md_jax.benchmarks.inpainting_eval --workdir=workdirs/main [--num=256] \
      [--checkpoint=ufogen --sampler=ufogen --steps=1 --cfg=1] [--margin=3] [--grid=FILE.png]

Held-out single-shape scenes of the main job's validation split; the mask (the region repainted)
is the shape's bounding box, read off the image by `data/conditions.foreground_mask`, grown by
`--margin` pixels; the prompt is the scene's own caption. The kept region is held by the
training-free route (`pipeline/inpainting.py`). Reports the PSNR of the kept pixels against the
input, and how often the job's `shapes_classifier` reads the repainted shape's kind, colour and
size as the caption's (all three, and each), beside the same prompts and noise generated without
an input image (what the model draws unconstrained). The last line is one JSON object.
"""

import json

import numpy as np
from absl import app, flags

from md_jax.benchmarks import timing


def define_flags():
  flags.DEFINE_string("workdir", None, "A main job's workdir.", required=True)
  flags.DEFINE_string("checkpoint", "ufogen", "Its stage that generates.")
  flags.DEFINE_string("classifier", "shapes_classifier", "Its stage that scores.")
  flags.DEFINE_enum("sampler", "ufogen", ["ddim", "dpm++", "ufogen"], "Sampler.")
  flags.DEFINE_integer("steps", 1, "Network evaluations.")
  flags.DEFINE_float("cfg", 1.0, "Classifier-free guidance scale (ddim, dpm++).")
  flags.DEFINE_integer("num", 256, "Single-shape validation scenes.")
  flags.DEFINE_integer("margin", 3, "Pixels the mask extends past the shape's bounding box.")
  flags.DEFINE_integer("batch", 32, "Images per generate call.")
  flags.DEFINE_string(
    "grid", None, "PNG, 16 rows: input | mask | inpainted | unconstrained [| plugin]."
  )
  flags.DEFINE_string(
    "plugin", None, "An `inpaint` plugin run: the trained route, scored beside the training-free."
  )


def main(argv):
  del argv
  from md_jax.data import conditions
  from md_jax.evaluation import feature_networks, inpaint_eval
  from md_jax.infra import sharding
  from md_jax.pipeline import control as control_lib
  from md_jax.pipeline.text_to_image import TextToImage

  FLAGS = flags.FLAGS
  workdir = FLAGS.workdir.rstrip("/")
  pipeline, params, step, config = TextToImage.from_checkpoint(f"{workdir}/{FLAGS.checkpoint}")
  scenes = inpaint_eval.single_shape_scenes(config.data, FLAGS.num)
  images = scenes["image"]
  masks = inpaint_eval.box_masks(images, FLAGS.margin)
  mesh = sharding.create_mesh((-1, 1))
  _, classify, _ = feature_networks.shapes_classifier_features(
    f"{workdir}/{FLAGS.classifier}", mesh
  )
  kw = dict(sampler=FLAGS.sampler, steps=FLAGS.steps, cfg=FLAGS.cfg, batch_size=FLAGS.batch)
  out = {
    "inpainted": inpaint_eval.inpaint_all(pipeline, params, scenes, masks, **kw),
    "unconstrained": inpaint_eval.inpaint_all(pipeline, params, scenes, None, **kw),
  }
  if FLAGS.plugin:  # the trained route: the plugin reads the grayed-out image and the mask
    adapter, adapter_params, plugin_config = control_lib.load_plugin(FLAGS.plugin)
    if plugin_config.plugin.condition != "inpaint":
      raise app.UsageError(f"--plugin={FLAGS.plugin!r} reads {plugin_config.plugin.condition!r}")
    maps = np.stack([conditions.inpaint_condition(i, m) for i, m in zip(images, masks)])
    out["plugin"] = inpaint_eval.inpaint_all(
      pipeline, params, scenes, masks, control=(adapter, adapter_params, maps), **kw
    )
  result = {
    **timing.machine(), "workdir": workdir, "checkpoint": FLAGS.checkpoint, "step": int(step),
    "sampler": FLAGS.sampler, "steps": FLAGS.steps, "cfg": FLAGS.cfg, "num": len(images),
    "margin": FLAGS.margin, "masked_fraction": float(masks.mean()), "plugin": FLAGS.plugin,
  }  # fmt: skip
  for name, generated in out.items():
    result[name] = inpaint_eval.score(generated, scenes, masks, classify)
    print(f"{name:<14} object (kind, colour, size) right {result[name]['object_right']:.3f}  "
          f"kept-region PSNR median {result[name]['kept_psnr_median']:.1f} dB")  # fmt: skip
  if FLAGS.grid:
    from md_jax import visualize

    rows = slice(0, 16)
    mask_rgb = np.repeat(masks[rows, ..., None] * 255, 3, axis=-1).astype(np.uint8)
    columns = [images[rows], mask_rgb, *(out[k][rows] for k in out)]
    grid = np.stack(columns, 1)
    visualize.save_png(
      visualize.make_grid(grid.reshape(-1, *grid.shape[2:]), columns=len(columns)), FLAGS.grid
    )
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

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

OBJECT_KEYS = ("kind_0", "color_0", "size_0")


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


def box_masks(images: np.ndarray, margin: int) -> np.ndarray:
  """uint8 (N, H, W), 1 on the foreground's bounding box grown by `margin` pixels."""
  from md_jax.data import conditions

  masks = np.zeros(images.shape[:3], np.uint8)
  for mask, image in zip(masks, images):
    ys, xs = np.nonzero(conditions.foreground_mask(image))
    if len(ys):
      h, w = mask.shape
      mask[max(ys.min() - margin, 0) : min(ys.max() + margin + 1, h),
           max(xs.min() - margin, 0) : min(xs.max() + margin + 1, w)] = 1  # fmt: skip
  return masks


def kept_psnr(generated: np.ndarray, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """PSNR (dB, per image) over the pixels the mask keeps, 8-bit peak."""
  keep = (masks == 0)[..., None]
  diff = (generated.astype(np.float64) - images.astype(np.float64)) ** 2
  mse = (diff * keep).sum(axis=(1, 2, 3)) / np.maximum(keep.sum(axis=(1, 2, 3)) * 3, 1)
  return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def single_shape_scenes(config, num: int) -> dict:
  """The first `num` one-shape examples of the validation split of `config.data.dataset`."""
  import tensorflow_datasets as tfds

  data = tfds.load(config.data.dataset, split="validation", data_dir=config.data.data_dir or None)
  rows = {"image": [], "caption": [], **{k: [] for k in OBJECT_KEYS}}
  for example in tfds.as_numpy(data):
    if int(example["num_shapes"]) != 0:  # label 0 is "1"
      continue
    rows["image"].append(example["image"])
    rows["caption"].append(example["caption"].decode())
    for key in OBJECT_KEYS:
      rows[key].append(int(example[key]))
    if len(rows["image"]) == num:
      break
  return {k: np.asarray(v) if k != "caption" else v for k, v in rows.items()}


def main(argv):
  del argv
  import jax

  from md_jax.evaluation import feature_networks
  from md_jax.infra import sharding
  from md_jax.pipeline.inpainting import Inpaint
  from md_jax.pipeline.text_to_image import TextToImage

  FLAGS = flags.FLAGS
  workdir = FLAGS.workdir.rstrip("/")
  pipeline, params, step, config = TextToImage.from_checkpoint(f"{workdir}/{FLAGS.checkpoint}")
  scenes = single_shape_scenes(config, FLAGS.num)
  images = scenes["image"]
  masks = box_masks(images, FLAGS.margin)
  mesh = sharding.create_mesh((-1, 1))
  _, classify, _ = feature_networks.shapes_classifier_features(
    f"{workdir}/{FLAGS.classifier}", mesh
  )
  kw = dict(sampler=FLAGS.sampler, steps=FLAGS.steps, cfg=FLAGS.cfg, resolution=images.shape[1])
  out = {"inpainted": [], "unconstrained": []}
  if FLAGS.plugin:  # the trained route: the plugin reads the grayed-out image and the mask
    from md_jax.data import conditions
    from md_jax.pipeline import control as control_lib

    adapter, adapter_params, plugin_config = control_lib.load_plugin(FLAGS.plugin)
    if plugin_config.plugin.condition != "inpaint":
      raise app.UsageError(f"--plugin={FLAGS.plugin!r} reads {plugin_config.plugin.condition!r}")
    maps = np.stack([conditions.inpaint_condition(i, m) for i, m in zip(images, masks)])
    out["plugin"] = []
  for start in range(0, len(images), FLAGS.batch):
    part = slice(start, start + FLAGS.batch)
    prompts, key = scenes["caption"][part], jax.random.fold_in(jax.random.key(0), start)
    inpaint = Inpaint(images[part], masks[part])
    out["inpainted"].append(pipeline.generate(params, prompts, seed=key, inpaint=inpaint, **kw))
    out["unconstrained"].append(pipeline.generate(params, prompts, seed=key, **kw))
    if FLAGS.plugin:
      control = (adapter, adapter_params, maps[part])
      out["plugin"].append(
        pipeline.generate(params, prompts, seed=key, inpaint=inpaint, control=control, **kw)
      )
  result = {
    **timing.machine(), "workdir": workdir, "checkpoint": FLAGS.checkpoint, "step": int(step),
    "sampler": FLAGS.sampler, "steps": FLAGS.steps, "cfg": FLAGS.cfg, "num": len(images),
    "margin": FLAGS.margin, "masked_fraction": float(masks.mean()), "plugin": FLAGS.plugin,
  }  # fmt: skip
  for name, parts in out.items():
    generated = np.concatenate([np.asarray(p) for p in parts])
    out[name] = generated
    logits, _ = classify(jax.numpy.asarray(generated, jax.numpy.float32) / 127.5 - 1.0)
    right = {k: np.asarray(logits[k]).argmax(-1) == scenes[k] for k in OBJECT_KEYS}
    psnr = kept_psnr(generated, images, masks)
    result[name] = {
      "object_right": float(np.mean(np.all(list(right.values()), axis=0))),
      **{f"{k}_right": float(np.mean(v)) for k, v in right.items()},
      "kept_psnr_median": float(np.median(psnr)),
      "kept_psnr_mean": float(np.mean(psnr)),
    }
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

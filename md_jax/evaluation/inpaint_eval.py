"""Inpainting on `shapes`, scored (issue 42): one shape masked out and repainted from its caption.

Held-out single-shape scenes; the mask (the region repainted) is the shape's bounding box, read
off the image by `data/conditions.foreground_mask`, grown by a margin; the prompt is the scene's
own caption. Two figures: the PSNR of the kept pixels against the input, and how often the
`shapes_classifier` reads the repainted shape's kind, colour and size as the caption's.
"""

import jax
import numpy as np

OBJECT_KEYS = ("kind_0", "color_0", "size_0")


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


def single_shape_scenes(data_config, num: int, resolution: int | None = None) -> dict:
  """The first `num` one-shape examples of the validation split of `data_config.dataset`:
  images (resized to `resolution` when given), captions and the shape's labels (OBJECT_KEYS)."""
  import cv2
  import tensorflow_datasets as tfds

  data = tfds.load(data_config.dataset, split="validation", data_dir=data_config.data_dir or None)
  rows = {"image": [], "caption": [], **{k: [] for k in OBJECT_KEYS}}
  for example in tfds.as_numpy(data):
    if int(example["num_shapes"]) != 0:  # label 0 is "1"
      continue
    image = example["image"]
    if resolution and image.shape[:2] != (resolution, resolution):
      image = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_AREA)
    rows["image"].append(image)
    rows["caption"].append(example["caption"].decode())
    for key in OBJECT_KEYS:
      rows[key].append(int(example[key]))
    if len(rows["image"]) == num:
      break
  if not rows["image"]:
    raise ValueError(f"{data_config.dataset!r}'s validation split holds no single-shape scene")
  return {k: np.asarray(v) if k != "caption" else v for k, v in rows.items()}


def inpaint_all(pipeline, params, scenes, masks, *, sampler, steps, cfg, seed=0, batch_size=32,
                control=None) -> np.ndarray:  # fmt: skip
  """uint8 images: each scene's masked region repainted from its caption, the rest held
  (`pipeline/inpainting.py`); `control`: (adapter, its params, maps (N, H, W, C)) for the trained
  route. Batch `i`'s noise is fold_in(seed, start row), for any route alike."""
  from md_jax.pipeline.inpainting import Inpaint

  images, out = scenes["image"], []
  for start in range(0, len(images), batch_size):
    part = slice(start, start + batch_size)
    plugin = None if control is None else (control[0], control[1], control[2][part])
    generated = pipeline.generate(
      params, scenes["caption"][part], seed=jax.random.fold_in(jax.random.key(seed), start),
      sampler=sampler, steps=steps, cfg=cfg, resolution=images.shape[1],
      inpaint=None if masks is None else Inpaint(images[part], masks[part]), control=plugin,
    )  # fmt: skip
    out.append(np.asarray(jax.device_get(generated)))
  return np.concatenate(out)


def score(generated: np.ndarray, scenes: dict, masks: np.ndarray, classify) -> dict:
  """The repainted shape's attributes (all three right, and each) by `classify` (the shapes
  classifier's logits on [−1, 1] images), and the kept region's PSNR."""
  logits, _ = classify(jax.numpy.asarray(generated, jax.numpy.float32) / 127.5 - 1.0)
  right = {k: np.asarray(logits[k]).argmax(-1) == scenes[k] for k in OBJECT_KEYS}
  psnr = kept_psnr(generated, scenes["image"], masks)
  return {
    "object_right": float(np.mean(np.all(list(right.values()), axis=0))),
    **{f"{k}_right": float(np.mean(v)) for k, v in right.items()},
    "kept_psnr_median": float(np.median(psnr)),
    "kept_psnr_mean": float(np.mean(psnr)),
  }

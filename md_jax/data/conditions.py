"""Condition maps for control plugins (issue 42), computed from a decoded image on the host.

    conditions.compute("canny", image)  # uint8 (H, W, 3) → uint8 (H, W, 1), 0 or 255

`Preprocess` adds one per name in `config.data.conditions`, as batch key `condition_<name>`; a
plugin (`models/control_adapter.py`) reads one. Kinds:

  * "canny": OpenCV's Canny on the colour image (gradient of the strongest channel, so a shape
    whose luminance matches its background still has an outline), 0/255 in one channel.
  * "mask": the foreground, i.e. what differs from the background colour, read off the image's
    border (a `shapes` scene is drawn on a flat background; elsewhere a rough saliency map).
  * "layout": the colour layout, averaged over 8×8 cells and scaled back up (ControlNet's
    "shuffle"/T2I-Adapter's "color" plugin): where which colour goes, not the outlines.
  * "inpaint": what an inpainting plugin reads, the image with a region grayed out (3 channels)
    and that region's mask (1 channel, 255 = repaint). In training the region is one foreground
    object's bounding box grown by a few pixels, chosen from the image's own bytes (the same
    every epoch, so a resumed run sees the same maps); at inference, the user's mask
    (`inpaint_condition`).

All are uint8 so they cross to the devices as the images do (a quarter of float32's bytes).
"""

import hashlib

import cv2
import numpy as np

KINDS = {"canny": 1, "mask": 1, "layout": 3, "inpaint": 4}  # kind → channels
# Hysteresis thresholds on the Sobel gradient: the outlines of flat-coloured shapes pass, the
# PNG's anti-aliasing ramps and JPEG noise do not.
CANNY_LOW, CANNY_HIGH = 60, 150
MASK_THRESHOLD = 40  # max-channel difference from the background that counts as foreground
LAYOUT_CELL = 8
INPAINT_FILL = 127  # the masked region's value: mid-gray, 0 after the adapter's [−1, 1] scaling
# Pixels a training mask extends past the object's box, drawn in this range.
INPAINT_MARGINS = (1, 6)
MIN_OBJECT_PIXELS = 4  # smaller foreground specks (noise, compression) are no object


def channels(kind: str) -> int:
  if kind not in KINDS:
    raise ValueError(f"condition {kind!r}: expected one of {sorted(KINDS)}")
  return KINDS[kind]


def canny(image: np.ndarray) -> np.ndarray:
  """0/255 edges (H, W) of a uint8 RGB image (H, W, 3) or a batch of them (..., H, W, 3)."""
  image = np.asarray(image, np.uint8)
  if image.ndim > 3:
    return np.stack([canny(x) for x in image])
  return cv2.Canny(np.ascontiguousarray(image), CANNY_LOW, CANNY_HIGH, L2gradient=True)


def foreground_mask(image: np.ndarray) -> np.ndarray:
  """0/255 (H, W): pixels whose colour differs from the median colour of the image's border."""
  image = np.asarray(image, np.int16)
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
  background = np.median(border, axis=0)
  return np.where(np.max(np.abs(image - background), axis=-1) > MASK_THRESHOLD, 255, 0).astype(
    np.uint8
  )


def colour_layout(image: np.ndarray) -> np.ndarray:
  """(H, W, 3) uint8: the mean colour of each LAYOUT_CELL-pixel cell, upsampled back (nearest)."""
  h, w = image.shape[:2]
  small = cv2.resize(image, (max(1, w // LAYOUT_CELL), max(1, h // LAYOUT_CELL)),
                     interpolation=cv2.INTER_AREA)  # fmt: skip
  return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def inpaint_condition(image: np.ndarray, repaint: np.ndarray) -> np.ndarray:
  """(H, W, 4) uint8: `image` grayed out where `repaint` (H, W) is nonzero, then the 0/255 mask."""
  repaint = np.asarray(repaint) > 0
  kept = np.where(repaint[..., None], np.uint8(INPAINT_FILL), np.asarray(image, np.uint8))
  return np.concatenate([kept, (repaint * 255).astype(np.uint8)[..., None]], axis=-1)


def object_box_mask(image: np.ndarray, margin: int, which: int = 0) -> np.ndarray:
  """(H, W) 0/1: the bounding box of foreground object number `which` (mod their count, by
  area, largest first) grown by `margin` pixels; the central quarter when there is none."""
  h, w = image.shape[:2]
  mask = np.zeros((h, w), np.uint8)
  _, _, stats, _ = cv2.connectedComponentsWithStats(foreground_mask(image), connectivity=8)
  boxes = sorted((s for s in stats[1:].tolist() if s[cv2.CC_STAT_AREA] >= MIN_OBJECT_PIXELS),
                 key=lambda s: -s[cv2.CC_STAT_AREA])  # fmt: skip
  if not boxes:
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    return mask
  x, y, bw, bh, _ = boxes[which % len(boxes)]
  mask[max(y - margin, 0) : y + bh + margin, max(x - margin, 0) : x + bw + margin] = 1
  return mask


def _training_inpaint(image: np.ndarray) -> np.ndarray:
  digest = int.from_bytes(
    hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=4).digest()
  )
  low, high = INPAINT_MARGINS
  margin = low + digest % (high - low + 1)
  return inpaint_condition(image, object_box_mask(image, margin, which=digest >> 8))


def compute(kind: str, image: np.ndarray) -> np.ndarray:
  """The `kind` map of one uint8 RGB image (H, W, 3), uint8 (H, W, channels(kind))."""
  channels(kind)
  if kind == "canny":
    out = canny(image)
  elif kind == "mask":
    out = foreground_mask(image)
  elif kind == "inpaint":
    out = _training_inpaint(np.asarray(image, np.uint8))
  else:
    out = colour_layout(np.asarray(image, np.uint8))
  return out.reshape(*image.shape[:2], -1)

"""Whether generated images draw a personalization concept (`data/concept.py`): the shape's
outline read with OpenCV, no learned network.

The image's foreground (`data/conditions.foreground_mask`: pixels off the border's median colour)
gives contours; the largest is simplified by Douglas-Peucker (`cv2.approxPolyDP`, tolerance
`EPSILON` × its perimeter). A hexagon is a convex polygon of six nearly equal sides (shortest ≥
`MIN_SIDE_RATIO` × longest: a lopsided blob can simplify to six vertices too) whose area fills the
enclosing circle as a regular hexagon does (3√3/2π ≈ 0.83: a small circle can simplify to six
vertices, but fills its circle, ≥ 0.86 rendered). Validated on rendered ground truth of every kind
and size (tests/test_lora_stage.py; rendered hexagons' sides are within 0.66 of each other).
A bar is elongated (its minimum-area rectangle's long side ≥ `BAR_ELONGATION` × its short one;
rendered bars ≥ 2.5, every dataset kind ≤ 1.3) and fills that rectangle (≥ `BAR_FILL`; an
ellipse fills π/4).

`concept_rate` generates the concept prompts (token captions of held-out scenes) with a pipeline
and params (a LoRA merged or not) and returns the share read as the concept.
"""

import cv2
import jax
import numpy as np

from md_jax.data import concept, conditions

EPSILON = 0.03  # approxPolyDP's tolerance, a fraction of the contour's perimeter
KINDS = ("hexagon", "bar")
HEXAGON_FILL = (0.70, 0.855)  # of the enclosing circle; a regular hexagon's is 0.83
BAR_ELONGATION = 2.0
BAR_FILL = 0.75
MIN_AREA = 12.0  # pixels: smaller specks are no shape
MIN_SIDE_RATIO = 0.6  # the simplified polygon's shortest side over its longest


def outline(image: np.ndarray) -> dict | None:
  """Measures of the largest foreground shape of a uint8 RGB image (None without one): its
  simplified outline's vertices, shortest / longest side and convexity, the share of its
  enclosing circle it fills, its minimum-area rectangle's elongation and the share it fills."""
  mask = conditions.foreground_mask(np.asarray(image, np.uint8))
  contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  if not contours:
    return None
  contour = max(contours, key=cv2.contourArea)
  area = cv2.contourArea(contour)
  if area < MIN_AREA:
    return None
  polygon = cv2.approxPolyDP(contour, EPSILON * cv2.arcLength(contour, True), True)
  points = polygon[:, 0, :].astype(np.float64)
  sides = np.linalg.norm(points - np.roll(points, 1, axis=0), axis=1)
  _, radius = cv2.minEnclosingCircle(contour)
  _, (width, height), _ = cv2.minAreaRect(contour)
  return {
    "vertices": len(points),
    "side_ratio": float(sides.min() / sides.max()),
    "convex": bool(cv2.isContourConvex(polygon)),
    "circle_fill": float(area / (np.pi * radius**2)),
    "elongation": float(max(width, height) / max(min(width, height), 1e-6)),
    "rectangle_fill": float(area / max(width * height, 1e-6)),
  }


def is_kind(image: np.ndarray, kind: str = concept.DEFAULT_KIND) -> bool:
  """Whether the image's largest shape is a `kind` (one of KINDS)."""
  if kind not in KINDS:
    raise ValueError(f"no detector for kind {kind!r} (known: {KINDS})")
  m = outline(image)
  if m is None:
    return False
  if kind == "bar":
    return m["elongation"] >= BAR_ELONGATION and m["rectangle_fill"] >= BAR_FILL
  regular = m["convex"] and m["side_ratio"] >= MIN_SIDE_RATIO
  low, high = HEXAGON_FILL
  return m["vertices"] == 6 and low <= m["circle_fill"] <= high and regular


def concept_prompts(
  num: int, *, seed: int, token=concept.DEFAULT_TOKEN, kind=concept.DEFAULT_KIND, resolution=64
) -> concept.ConceptSet:
  """Held-out concept prompts (and the images they describe): another seed than training's."""
  return concept.concept_set(num, resolution, seed=seed, kind=kind, token=token)


def generate_all(pipeline, params, prompts, *, sampler, steps, cfg, seed=0, batch_size=32,
                 resolution=None) -> np.ndarray:  # fmt: skip
  """uint8 images for `prompts`, batch `i`'s noise from fold_in(seed, i) (as `caption_eval`)."""
  out = []
  for index, start in enumerate(range(0, len(prompts), batch_size)):
    images = pipeline.generate(
      params, list(prompts[start : start + batch_size]),
      seed=jax.random.fold_in(jax.random.key(seed), index), resolution=resolution,
      sampler=sampler, steps=steps, cfg=cfg,
    )  # fmt: skip
    out.append(np.asarray(jax.device_get(images)))
  return np.concatenate(out)


def concept_rate(images, kind: str = concept.DEFAULT_KIND) -> float:
  """The share of `images` whose largest shape reads as `kind`."""
  return float(np.mean([is_kind(image, kind) for image in images]))

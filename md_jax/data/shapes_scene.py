"""Scenes of the embedded `shapes` dataset: attributes sampled from a seed, drawn, and captioned.

Kept free of TFDS so the evaluator and tests can draw and caption a scene directly. Every attribute
in a caption is also a label, so a classifier can score whether a generated image obeys its prompt.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
# Kinds `render` draws that the dataset never samples (not in KINDS, so not in its captions or
# labels): a concept the trained models never saw, for personalization (the `lora` stage).
EXTRA_KINDS = ("hexagon", "bar")
COLORS = {
  "red": (220, 38, 38),
  "orange": (245, 140, 20),
  "yellow": (240, 215, 30),
  "green": (40, 165, 60),
  "cyan": (30, 200, 215),
  "blue": (40, 70, 225),
  "purple": (135, 55, 195),
  "pink": (245, 120, 185),
}
BACKGROUNDS = {
  "white": (245, 245, 245),
  "black": (20, 20, 20),
  "gray": (128, 128, 128),
  "beige": (225, 205, 170),
}
SIZES = ("small", "large")
# One shape: where it sits. Two shapes: where the first sits relative to the second.
PLACEMENTS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
POSITIONS = PLACEMENTS + RELATIONS
NONE = "none"  # label of the second shape's attributes in a one-shape scene

_PLACEMENT_PHRASE = {
  "left": "on the left",
  "right": "on the right",
  "top": "at the top",
  "bottom": "at the bottom",
  "center": "in the center",
}
# Diameter as a fraction of the image side.
_SIZE_FRACTION = {"small": 0.22, "large": 0.40}
# Where a lone shape's centre lies, as fractions of the side.
_PLACEMENT_CENTER = {
  "left": (0.27, 0.5),
  "right": (0.73, 0.5),
  "top": (0.5, 0.27),
  "bottom": (0.5, 0.73),
  "center": (0.5, 0.5),
}
# Where (first shape, second shape) lie for each relation.
_RELATION_CENTERS = {
  "left of": ((0.27, 0.5), (0.73, 0.5)),
  "right of": ((0.73, 0.5), (0.27, 0.5)),
  "above": ((0.5, 0.27), (0.5, 0.73)),
  "below": ((0.5, 0.73), (0.5, 0.27)),
}
_JITTER = 0.05  # position jitter, fraction of the side: the same caption has many images


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  size: str


@dataclasses.dataclass(frozen=True)
class Scene:
  shapes: tuple[Shape, ...]  # one or two
  position: str  # a PLACEMENT for one shape, a RELATION for two
  background: str
  jitter: tuple[tuple[float, float], ...]  # per-shape centre offset, fraction of the side

  @property
  def caption(self) -> str:
    def phrase(s: Shape) -> str:
      return f"a {s.size} {s.color} {s.kind}"

    if len(self.shapes) == 1:
      where = _PLACEMENT_PHRASE[self.position]
      return f"{phrase(self.shapes[0])} {where} on a {self.background} background"
    first, second = self.shapes
    return f"{phrase(first)} {self.position} {phrase(second)} on a {self.background} background"

  @property
  def labels(self) -> dict[str, str]:
    """Attribute names per label key; the second shape's are NONE in a one-shape scene."""
    second = self.shapes[1] if len(self.shapes) == 2 else Shape(NONE, NONE, NONE)
    return {
      "num_shapes": str(len(self.shapes)),
      "kind_0": self.shapes[0].kind,
      "color_0": self.shapes[0].color,
      "size_0": self.shapes[0].size,
      "kind_1": second.kind,
      "color_1": second.color,
      "size_1": second.size,
      "position": self.position,
      "background": self.background,
    }


# The label vocabulary, in the order TFDS ClassLabels number them.
LABEL_NAMES = {
  "num_shapes": ("1", "2"),
  "kind_0": KINDS,
  "color_0": tuple(COLORS),
  "size_0": SIZES,
  "kind_1": (*KINDS, NONE),
  "color_1": (*COLORS, NONE),
  "size_1": (*SIZES, NONE),
  "position": POSITIONS,
  "background": tuple(BACKGROUNDS),
}

_MIRRORED_RELATIONS = {"right of": "left of", "below": "above"}


def canonical_labels(labels):
  """Label ids (dict of int arrays) with a two-shape scene's shapes in image order.

  "a red circle right of a blue square" and "a blue square left of a red circle" caption the same
  image, so no classifier can tell which shape its caption named first: trained on the labels as
  captioned it stalls at chance on them. So the classifier learns, and the evaluator compares, this
  canonical form: "right of" / "below" become "left of" / "above" with the two shapes' attributes
  swapped. Takes and returns numpy or jax arrays (keys other than these pass through).
  """
  import jax.numpy as jnp

  position = jnp.asarray(labels["position"])
  canonical = position
  swap = jnp.zeros(position.shape, bool)
  for mirrored, kept in _MIRRORED_RELATIONS.items():
    is_mirrored = position == POSITIONS.index(mirrored)
    canonical = jnp.where(is_mirrored, POSITIONS.index(kept), canonical)
    swap = swap | is_mirrored
  out = {**labels, "position": canonical}
  for attribute in ("kind", "color", "size"):
    first, second = labels[f"{attribute}_0"], labels[f"{attribute}_1"]
    out[f"{attribute}_0"] = jnp.where(swap, second, first)
    out[f"{attribute}_1"] = jnp.where(swap, first, second)
  return out


def sample_scene(rng: np.random.Generator) -> Scene:
  num = int(rng.integers(1, 3))
  shapes = []
  for _ in range(num):
    shapes.append(
      Shape(
        kind=KINDS[rng.integers(len(KINDS))],
        color=tuple(COLORS)[rng.integers(len(COLORS))],
        size=SIZES[rng.integers(len(SIZES))],
      )
    )
  positions = PLACEMENTS if num == 1 else RELATIONS
  position = positions[rng.integers(len(positions))]
  jitter = tuple(tuple(rng.uniform(-_JITTER, _JITTER, size=2).tolist()) for _ in range(num))
  background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  return Scene(tuple(shapes), position, background, jitter)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if kind == "square":
    r *= 0.88  # same visual area as the circle, roughly
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if kind == "triangle":
    angles = np.deg2rad([-90, 30, 150])
    return [(cx + r * np.cos(a), cy + r * np.sin(a) + 0.15 * r) for a in angles]
  if kind == "star":
    angles = np.deg2rad(np.arange(10) * 36 - 90)
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
  if kind == "hexagon":  # pointy top, like the triangle and the star
    angles = np.deg2rad(np.arange(6) * 60 - 90)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
  if kind == "bar":  # a horizontal bar, 2.9:1: an extent no dataset kind has
    w, h = 1.1 * r, 0.38 * r
    return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)]
  raise ValueError(f"unknown shape kind {kind!r}")


def render(scene: Scene, resolution: int, supersample: int = 2) -> np.ndarray:
  """Draws the scene as a uint8 (resolution, resolution, 3) array.

  Drawn at `supersample`× and box-filtered down, so edges are anti-aliased like a photo's rather
  than jagged, which a diffusion model would otherwise spend capacity reproducing.
  """
  side = resolution * supersample
  image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(image)
  if len(scene.shapes) == 1:
    centers = [_PLACEMENT_CENTER[scene.position]]
  else:
    centers = list(_RELATION_CENTERS[scene.position])
  for shape, (fx, fy), (jx, jy) in zip(scene.shapes, centers, scene.jitter):
    cx, cy = (fx + jx) * side, (fy + jy) * side
    r = 0.5 * _SIZE_FRACTION[shape.size] * side
    color = COLORS[shape.color]
    if shape.kind == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
      draw.polygon(_polygon(shape.kind, cx, cy, r), fill=color)
  if supersample > 1:
    image = image.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(image)


def parse_caption(caption: str) -> dict[str, str]:
  """Recovers the label attributes from a caption: the inverse of `Scene.caption`.

  The evaluator uses it to score images generated from free-text prompts that follow the grammar.
  """
  words = caption.strip().lower()
  if not words.endswith(" background"):
    raise ValueError(f"not a shapes caption: {caption!r}")
  body, background = words[: -len(" background")].rsplit(" on a ", 1)

  def shape(phrase: str) -> Shape:
    parts = phrase.split()
    if len(parts) != 4 or parts[0] != "a":
      raise ValueError(f"not a shapes caption: {caption!r}")
    return Shape(kind=parts[3], color=parts[2], size=parts[1])

  for relation in RELATIONS:
    token = f" {relation} "
    if token in body:
      first, second = body.split(token)
      scene = Scene((shape(first), shape(second)), relation, background, ((0, 0), (0, 0)))
      return scene.labels
  for placement, phrase in _PLACEMENT_PHRASE.items():
    if body.endswith(" " + phrase):
      first = body[: -len(phrase) - 1]
      return Scene((shape(first),), placement, background, ((0, 0),)).labels
  raise ValueError(f"not a shapes caption: {caption!r}")


def caption_label_ids(captions) -> dict[str, np.ndarray]:
  """{label key: (N,) ids} of the attributes `captions` name, in canonical shape order: what a
  classifier trained on `shapes` labels predicts, for prompts written in the dataset's grammar."""
  named = [parse_caption(caption) for caption in captions]
  ids = {
    key: np.asarray([names.index(labels[key]) for labels in named], np.int32)
    for key, names in LABEL_NAMES.items()
  }
  return {key: np.asarray(v) for key, v in canonical_labels(ids).items()}

"""A personalization concept: a handful of rendered images of a kind the `shapes` dataset never
samples (`shapes_scene.EXTRA_KINDS`), captioned with a rare token in the dataset's grammar,
DreamBooth style (Ruiz et al., 2023):

    "a large red sks on the left on a white background"   (an image of a large red hexagon)

The kinds: "hexagon" (close to a circle: its corners are the concept) and "bar" (a 2.9:1
rectangle: an extent no dataset kind has). The token takes the kind's place, so every other word
is one the base model knows, and the caption still parses (`shapes_scene.parse_caption`: kind =
the token). With the shapes tokenizer "sks" is three byte-level pieces no training caption holds.
Scenes are one shape (colour, size, placement, background and jitter drawn from `seed`), so a
generated image answers "is this the concept?" by its one shape's outline
(`evaluation/concept_eval.py`). Everything is a pure function of (seed, count, resolution): a
held-out set is another seed.
"""

import dataclasses

import numpy as np

from md_jax.data import shapes_scene

DEFAULT_KIND = "hexagon"
DEFAULT_TOKEN = "sks"


@dataclasses.dataclass(frozen=True)
class ConceptSet:
  images: np.ndarray  # uint8 (N, H, W, 3)
  captions: tuple[str, ...]  # with the token where the kind goes
  scenes: tuple[shapes_scene.Scene, ...]  # as drawn (kind = the concept's)


def concept_scene(rng: np.random.Generator, kind: str = DEFAULT_KIND) -> shapes_scene.Scene:
  """One shape of `kind` with the dataset's colours, sizes, placements and backgrounds."""
  shape = shapes_scene.Shape(
    kind=kind,
    color=tuple(shapes_scene.COLORS)[rng.integers(len(shapes_scene.COLORS))],
    size=shapes_scene.SIZES[rng.integers(len(shapes_scene.SIZES))],
  )
  position = shapes_scene.PLACEMENTS[rng.integers(len(shapes_scene.PLACEMENTS))]
  jitter = (tuple(rng.uniform(-shapes_scene._JITTER, shapes_scene._JITTER, size=2).tolist()),)
  background = tuple(shapes_scene.BACKGROUNDS)[rng.integers(len(shapes_scene.BACKGROUNDS))]
  return shapes_scene.Scene((shape,), position, background, jitter)


def caption_with_token(scene: shapes_scene.Scene, token: str) -> str:
  """The scene's caption with `token` in place of its shapes' kind."""
  shapes = tuple(dataclasses.replace(s, kind=token) for s in scene.shapes)
  return dataclasses.replace(scene, shapes=shapes).caption


def concept_set(
  num: int, resolution: int, *, seed: int = 0, kind: str = DEFAULT_KIND, token: str = DEFAULT_TOKEN
) -> ConceptSet:
  """`num` images of `kind` and their token captions, a pure function of the arguments."""
  if kind not in shapes_scene.EXTRA_KINDS:
    raise ValueError(
      f"concept kind {kind!r}: expected one of {shapes_scene.EXTRA_KINDS} (a kind the shapes "
      f"dataset never samples; its kinds are {shapes_scene.KINDS})"
    )
  if not token or len(token.split()) != 1 or token in shapes_scene.KINDS:
    raise ValueError(f"concept token {token!r}: expected one word that is no shapes kind")
  if num <= 0:
    raise ValueError(f"a concept set needs at least one image, got {num}")
  rng = np.random.default_rng([seed, 4242])  # not the dataset's streams (seeded by split)
  scenes = tuple(concept_scene(rng, kind) for _ in range(num))
  images = np.stack([shapes_scene.render(scene, resolution) for scene in scenes])
  return ConceptSet(images, tuple(caption_with_token(s, token) for s in scenes), scenes)

"""Counterfactual kind pairs for `shapes`: each training scene drawn twice, one kind changed.

    config.data.kind_pairs = True   # diffusion stage: rows 2k and 2k+1 of each batch are a pair

Why: a small UNet on the main job's budget learns colours, sizes and places from the captions but
draws every kind as the same blob (BENCHMARKS.md, sessions 10–22). The kind's share of the loss is
small at the noise levels where an outline is decided, and it is buried in the target's noise. A
pair is the same scene (shapes, colours, sizes, places, jitter) drawn with one shape's kind
swapped and captioned accordingly; the diffusion step gives both members the same noise, timestep
and caption dropout (`DiffusionStage.train_step`). So the difference between the two members'
losses holds no noise at all, only what the kind word should change: common random numbers, a
variance reduction for the one attribute the plain recipe does not learn.

Both members are drawn afresh from the example's labels with jitter from the pair's own seed (the
stored image's jitter is not a label), at the stored images' resolution, then resized and cropped
like any example. The pair's draws are a pure function of (seed, pair index), so a resumed run
sees the same pairs.
"""

import dataclasses
import io
import sys
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

from md_jax.data import shapes_scene

PAIR = 2  # rows per pair


class KindPairsMapDataset(grain.MapDataset):
  """Element j is (parent[j // 2], j): each parent example twice, tagged with its row."""

  def __init__(self, parent: grain.MapDataset):
    super().__init__(parent)
    self._length = min(len(parent) * PAIR, sys.maxsize)  # a repeated parent is "infinite" already

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index // PAIR], index

  def _getitems(self, indices: Sequence[int]):
    examples = self._parent._getitems([i // PAIR for i in indices])
    return list(zip(examples, indices))

  def __str__(self) -> str:
    return "KindPairsMapDataset"


def scene_from_labels(example) -> shapes_scene.Scene:
  """The example's scene from its label ids (jitter zero): its caption is the example's."""
  names = {key: names[int(example[key])] for key, names in shapes_scene.LABEL_NAMES.items()}
  shapes = [
    shapes_scene.Shape(names[f"kind_{i}"], names[f"color_{i}"], names[f"size_{i}"])
    for i in range(int(names["num_shapes"]))
  ]
  jitter = ((0.0, 0.0),) * len(shapes)
  return shapes_scene.Scene(tuple(shapes), names["position"], names["background"], jitter)


def pair_member(scene: shapes_scene.Scene, rng: np.random.Generator, member: int):
  """Member 0 is `scene` as captioned, member 1 the same with one shape's kind swapped; both with
  the jitter `rng` draws (the same rng state gives the same pair)."""
  jitter = tuple(
    tuple(rng.uniform(-shapes_scene.JITTER, shapes_scene.JITTER, size=2).tolist())
    for _ in scene.shapes
  )
  shapes = list(scene.shapes)
  which = int(rng.integers(len(shapes)))
  others = [k for k in shapes_scene.KINDS if k != shapes[which].kind]
  new_kind = others[int(rng.integers(len(others)))]
  if member == 1:
    shapes[which] = dataclasses.replace(shapes[which], kind=new_kind)
  return dataclasses.replace(scene, shapes=tuple(shapes), jitter=jitter)


@dataclasses.dataclass(frozen=True)
class RenderKindPair:
  """(example, row) → the row's pair member, as `Preprocess` would return the example."""

  preprocess: object  # md_jax.data.pipeline.Preprocess: resize, crop, flip, label keys
  seed: int

  def __call__(self, element):
    example, row = element
    pair, member = divmod(row, PAIR)
    stored = Image.open(io.BytesIO(example[self.preprocess.image_key]))  # header only: its size
    scene = pair_member(
      scene_from_labels(example), np.random.default_rng([self.seed, pair]), member
    )
    image = Image.fromarray(shapes_scene.render(scene, stored.size[0]))
    # Crop and flip follow the pair, not the row, so both members keep their common geometry.
    pair_rng = np.random.default_rng([self.seed, pair, 1])
    image = self.preprocess.resize_and_crop(image, pair_rng)
    if self.preprocess.random_flip and pair_rng.random() < 0.5:
      image = image[:, ::-1]
    out = {"image": image, "caption": scene.caption}
    for key in self.preprocess.label_keys:
      out[key] = np.int32(shapes_scene.LABEL_NAMES[key].index(scene.labels[key]))
    return out

"""Which caption an example contributes, and where in an example a feature lives.

A dataset may hold one caption per example (`shapes`, ingested data) or a sequence of them (COCO:
`captions/text`, about five per image). Training draws one per example per epoch, evaluation a
fixed one; both draws are keyed on the example's row in the split (`RowSource`) and the epoch
(`WithEpoch`), never on the position in a shuffled stream, so that a resumed or multi-process run
reads the captions an uninterrupted one-process run reads.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

# Keys the pipeline adds to a decoded example: its row in the split (`image_source`) and, when
# training, its epoch. The caption a multi-caption example contributes is a function of them.
ROW_KEY = "_md_jax_row"
EPOCH_KEY = "_md_jax_epoch"


def feature_value(example: dict, key: str):
  """`example[key]`, where `key` may name a nested feature with "/" ("captions/text"): TFDS
  decodes a Sequence or FeaturesDict feature to a nested dict. A top-level key that holds a "/"
  itself (COCO's "image/id") is found first."""
  if key in example:
    return example[key]
  value = example
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise KeyError(f"no feature {key!r} in the example (its keys: {sorted(example)})")
    value = value[part]
  return value


def pick_caption(example: dict, caption_key: str, seed: int) -> str | None:
  """The caption `example` contributes: its only one, or one of a sequence of them, drawn from
  (seed, epoch, row) when the example carries an epoch (training: another each epoch) and from
  (seed, row) otherwise (evaluation: the same every run). None when it has none.

  The draw is keyed on the row in the split, not on the position in the shuffled stream or on
  Grain's per-element rng (which counts this process's rows): the same caption whatever the
  process count, and a resumed run — whose position is a few integers — draws the same ones.
  """
  value = feature_value(example, caption_key)
  if isinstance(value, (bytes, str)) or np.ndim(value) == 0:
    captions = [value]
  else:
    captions = list(value)
  if not captions:
    return None
  if len(captions) == 1:
    choice = 0
  else:
    if ROW_KEY not in example:
      raise ValueError(
        f"caption_key={caption_key!r} holds {len(captions)} captions but the example carries no "
        "row to draw one from: read it through `image_source`"
      )
    # The second word tells evaluation's draws from training's, which never coincide.
    if EPOCH_KEY in example:
      key = [seed, 1, example[EPOCH_KEY], example[ROW_KEY]]
    else:
      key = [seed, 0, example[ROW_KEY]]
    choice = int(np.random.default_rng(key).integers(len(captions)))
  caption = captions[choice]
  return caption.decode() if isinstance(caption, bytes) else str(caption)


def split_names(split: str) -> list[str]:
  """The split names in a TFDS split spec: "val+test[:10%]" → ["val", "test"]."""
  return [part.split("[")[0].strip() for part in split.split("+")]


def feature_names(features, prefix: str = "") -> set[str]:
  """Every feature's name, nested ones joined with "/" as `feature_value` reads them."""
  names = set()
  for name, feature in features.items():
    names.add(prefix + name)
    inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
    if isinstance(inner, tfds.features.FeaturesDict):
      names |= feature_names(inner, f"{prefix}{name}/")
  return names


def no_feature(what: str, key: str, dataset: str, names: set[str]) -> str:
  return (
    f"config.data.{what}={key!r}: {dataset} has no such feature (its features: {sorted(names)})"
  )


class RowSource:
  """A data source whose examples carry their row in the split (`ROW_KEY`): the key of the
  caption a multi-caption example contributes, the same wherever the example is read."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, row: int) -> dict:
    return {**self._source[row], ROW_KEY: int(row)}

  def __getitems__(self, rows):
    getitems = getattr(self._source, "__getitems__", None)  # one batched read where there is one
    examples = getitems(rows) if getitems else [self._source[r] for r in rows]
    return [{**e, ROW_KEY: int(r)} for r, e in zip(rows, examples)]

  def __repr__(self) -> str:
    return f"RowSource({self._source!r})"


@dataclasses.dataclass(frozen=True)
class WithEpoch:
  """Adds the epoch of the stream's element `index` (`EPOCH_KEY`): training draws a caption of
  a multi-caption example per epoch."""

  rows: int

  def __call__(self, index: int, example):
    return {**example, EPOCH_KEY: index // self.rows}

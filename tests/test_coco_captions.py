"""COCO captions read correctly: a sequence of captions under a nested key ("captions/text"), one
drawn per example per epoch when training (the same after a resume), a fixed one per example for
evaluation, and an example without captions skipped and counted.

The data is a small `coco_captions/2014` written with the real builder's feature spec (images,
captions/{id,text}, image/id, image/filename, objects) as ArrayRecord shards with TFDS metadata,
then read by the real path: `prepare_dataset` → `builder.as_data_source` → the pipeline.
`tfds.testing.mock_data` does not serve here: it patches `as_data_source` but not the
`builder_from_directory` that `prepare_dataset` reads through, and with the pipeline's image
decoder it returns encoded examples (and fails to encode COCO's two caption sequences, drawn at
different lengths).
"""

import dataclasses
import re

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming

from md_jax.data import ingest
from md_jax.data.captions import EPOCH_KEY, ROW_KEY, pick_caption
from md_jax.data.pipeline import create_input_iterator, eval_captions
from md_jax.infra import sharding

RULES = sharding.DEFAULT_LOGICAL_AXIS_RULES
SEED = 3
# Rows of each split; how many captions row r has is _num_captions(split, r): a few have none.
SPLITS = {"train": 16, "val": 6, "test": 5, "restval": 6}
EMPTY = {("train", 4), ("train", 11), ("test", 2)}


def _num_captions(split: str, row: int) -> int:
  return 0 if (split, row) in EMPTY else 1 + (row * 7 + len(split)) % 5


def _caption(split: str, row: int, j: int) -> str:
  return f"a photo from {split} row {row} caption {j}"


@pytest.fixture(scope="module")
def coco_data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("coco")
  builder = tfds.builder("coco_captions/2014", data_dir=str(data_dir), file_format="array_record")
  serialize = ingest.Serializer(builder.info.features)
  rng = np.random.default_rng(0)
  split_infos = []
  for split, rows in SPLITS.items():
    template = naming.ShardedFileTemplate(
      data_dir=builder.data_dir, dataset_name=builder.name, split=split,
      filetype_suffix="array_record",
    )  # fmt: skip
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer, num_bytes = ingest.open_shard_writer(path), 0
    for row in range(rows):
      example = {
        "image": rng.integers(0, 255, (20 + row, 28, 3), np.uint8),  # JPEG-encoded by the spec
        "image/filename": f"COCO_{split}_{row:012d}.jpg",
        "image/id": 1000 * len(split) + row,
        "captions": [
          {"id": 10 * row + j, "text": _caption(split, row, j)}
          for j in range(_num_captions(split, row))
        ],
        "objects": [
          {
            "area": 40,
            "bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
            "id": row,
            "is_crowd": False,
            "label": row % 80,
          },
        ],
      }
      record = serialize(example)
      writer.write(record)
      num_bytes += len(record)
    writer.close()
    split_infos.append(
      tfds.core.SplitInfo(
        name=split, shard_lengths=[rows], num_bytes=num_bytes, filename_template=template
      )
    )
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(builder.data_dir)
  return str(data_dir)


def _data_config(data_dir, **overrides):
  config = ml_collections.ConfigDict(
    {
      "dataset": "coco_captions/2014",
      "data_dir": data_dir,
      "split": "train",
      "image_key": "image",
      "caption_key": "captions/text",
      "label_keys": ("image/id",),  # a top-level key holding a "/", next to the nested one
      "resolution": 16,
      "random_crop": True,
      "random_flip": True,
      "seed": SEED,
      "num_threads": 2,
    }
  )
  config.update(overrides)
  return config


@dataclasses.dataclass(frozen=True)
class _CaptionIds:
  """A tokenizer whose tokens say which caption was read: [row, caption index, 0...]."""

  def __call__(self, captions, max_length, **unused):
    ids = []
    for caption in captions:
      row, j = map(int, re.fullmatch(r"a photo from \w+ row (\d+) caption (\d+)", caption).groups())
      ids.append([row, j] + [0] * (max_length - 2))
    return {"input_ids": ids}


def _read(config, num_batches=None, *, train=True, state=None):
  """(row, caption index, image/id) of each example read, and the iterator's state after."""
  mesh = sharding.create_mesh((8, 1))
  it = create_input_iterator(
    config, global_batch_size=8, mesh=mesh, rules=RULES, train=train, tokenizer=_CaptionIds()
  )
  if state is not None:
    it.set_state(state)
  picks = []
  for i, batch in enumerate(it):
    batch = jax.device_get(batch)
    assert batch["image"].shape == (8, 16, 16, 3)
    ids = batch.get("image/id", np.full(len(batch["tokens"]), -1))
    picks += [(int(t[0]), int(t[1]), int(k)) for t, k in zip(batch["tokens"], ids)]
    if num_batches is not None and i + 1 == num_batches:
      break
  state, skipped = it.get_state(), it.num_skipped
  it.close()
  return picks, state, skipped


def test_training_draws_a_caption_per_example_per_epoch_and_a_resume_draws_the_same(coco_data_dir):
  config = _data_config(coco_data_dir)
  picks, _, skipped = _read(config, 7)  # 56 examples: 4 epochs of the 14 with captions
  first, state, _ = _read(config, 3)
  rest, _, _ = _read(config, 4, state=state)
  assert first + rest == picks  # the resumed run reads the very captions of the uninterrupted one

  assert skipped >= 2  # the rows without captions were dropped, and counted
  assert not {row for row, _, _ in picks} & {r for s, r in EMPTY if s == "train"}
  epochs = {}
  for row, j, image_id in picks:
    assert image_id == 1000 * len("train") + row
    assert j < _num_captions("train", row)
    epochs.setdefault(row, []).append(j)  # each row is read once an epoch
  assert min(len(js) for js in epochs.values()) >= 3
  multi = [js for row, js in epochs.items() if _num_captions("train", row) > 1]
  assert sum(len(set(js)) > 1 for js in multi) > len(multi) // 2  # the caption changes by epoch
  assert all(len(set(js)) == 1 for row, js in epochs.items() if _num_captions("train", row) == 1)


def test_training_draws_follow_the_seed_epoch_and_row(coco_data_dir):
  picks, _, _ = _read(_data_config(coco_data_dir), 4)
  seen = {}
  for row, j, _ in picks:
    # Each row is read once an epoch: its k-th reading is epoch k's, drawn from (seed, k, row).
    epoch = seen[row] = seen.get(row, -1) + 1
    n = _num_captions("train", row)
    example = {"captions": {"text": [str(i).encode() for i in range(n)]}}
    assert pick_caption({**example, ROW_KEY: row, EPOCH_KEY: epoch}, "captions/text", SEED) == str(
      j
    )


def test_evaluation_reads_a_fixed_caption_per_example(coco_data_dir):
  # COCO 2014's validation images are the Karpathy val + test + restval splits of coco_captions.
  config = _data_config(coco_data_dir, split="val+test+restval", label_keys=())
  picks, _, skipped = _read(config, train=False)
  again, _, _ = _read(config, train=False)
  assert picks == again and skipped == 1  # 17 rows, one without captions: 2 batches of 8

  captions = eval_captions(config)
  rows = [(s, r) for s, n in SPLITS.items() if s != "train" for r in range(n)]
  assert len(captions) == len(rows)
  kept = [(c, (s, r)) for c, (s, r) in zip(captions, rows) if c is not None]
  assert [s_r for c, s_r in zip(captions, rows) if c is None] == [("test", 2)]
  # The pipeline read, in order, exactly the captions `eval_captions` lists.
  assert [(r, j) for r, j, _ in picks] == [
    (r, int(c.rsplit(" ", 1)[1])) for c, (_, r) in kept[: len(picks)]
  ]
  assert all(c == _caption(s, r, int(c.rsplit(" ", 1)[1])) for c, (s, r) in kept)
  other_seed = eval_captions(_data_config(coco_data_dir, split="val+test+restval", seed=SEED + 1))
  assert other_seed != captions  # seeded: the fixed choice is the seed's


def test_a_caption_key_or_split_the_dataset_lacks_is_one_error_naming_it(coco_data_dir):
  with pytest.raises(ValueError, match=r"config.data.caption_key='caption': .*'captions/text'"):
    eval_captions(_data_config(coco_data_dir, caption_key="caption"))
  with pytest.raises(ValueError, match=r"config.data.split='val\+validation'"):
    eval_captions(_data_config(coco_data_dir, split="val+validation"))


def test_a_single_caption_is_read_as_it_is():
  assert pick_caption({"caption": b"one"}, "caption", 0) == "one"
  assert pick_caption({"c": {"text": np.array([b"only"], object)}}, "c/text", 0) == "only"
  assert pick_caption({"c": {"text": []}}, "c/text", 0) is None
  with pytest.raises(ValueError, match=r"caption_key='c/text' holds 2 captions"):
    pick_caption({"c": {"text": [b"a", b"b"]}}, "c/text", 0)

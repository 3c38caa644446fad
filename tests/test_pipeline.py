"""The input pipeline: global sharded batches, determinism, exact resume, bad images skipped."""

import collections
import io
import json

import grain
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from md_jax.data.pipeline import create_input_iterator
from md_jax.data.process_rows import ProcessRowsMapDataset
from md_jax.infra import sharding

RULES = sharding.DEFAULT_LOGICAL_AXIS_RULES


def _data_config(data_dir, **overrides):
  config = ml_collections.ConfigDict(
    {
      "dataset": "shapes/r32_small",
      "data_dir": data_dir,
      "split": "train",
      "resolution": 24,
      "random_crop": True,
      "random_flip": True,
      "seed": 0,
      "label_keys": ("kind_0", "background"),
      "num_threads": 2,
    }
  )
  config.update(overrides)
  return config


def _take(iterator, n):
  batches = [jax.device_get(next(iterator)) for _ in range(n)]
  iterator.close()
  return batches


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_batches_are_global_arrays_sharded_over_the_batch_axes(shapes_data_dir, mesh_shape):
  mesh = sharding.create_mesh(mesh_shape)
  it = create_input_iterator(
    _data_config(shapes_data_dir), global_batch_size=16, mesh=mesh, rules=RULES
  )
  batch = next(it)
  it.close()
  assert batch["image"].shape == (16, 24, 24, 3) and batch["image"].dtype == np.float32
  assert batch["tokens"].shape == (16, 77) and batch["tokens"].dtype == np.int32
  assert batch["kind_0"].shape == (16,) and batch["kind_0"].dtype == np.int32
  for value in batch.values():
    assert isinstance(value, jax.Array)
    assert value.sharding.mesh.shape == mesh.shape
    assert value.sharding.spec[0] == ("data", "fsdp")
    assert {s.data.shape[0] for s in value.addressable_shards} == {2}
  image = np.asarray(batch["image"])
  assert image.min() >= -1 and image.max() <= 1 and image.min() < -0.5 < 0.5 < image.max()


def test_same_seed_same_batches_other_seed_other_batches(shapes_data_dir):
  mesh = sharding.create_mesh((2, 4))

  def batches(seed):
    config = _data_config(shapes_data_dir, seed=seed)
    return _take(create_input_iterator(config, global_batch_size=16, mesh=mesh, rules=RULES), 3)

  first, again, other = batches(0), batches(0), batches(1)
  for a, b in zip(first, again):
    _assert_same(a, b)
  assert not np.array_equal(first[0]["tokens"], other[0]["tokens"])


def test_restored_position_gives_the_identical_next_batch(shapes_data_dir):
  mesh = sharding.create_mesh((2, 4))
  config = _data_config(shapes_data_dir)
  # 512 examples / 64 per batch = 8 batches an epoch: step 9 lies in the second epoch.
  it = create_input_iterator(config, global_batch_size=64, mesh=mesh, rules=RULES)
  for _ in range(9):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 2)

  resumed = create_input_iterator(config, global_batch_size=64, mesh=mesh, rules=RULES)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 2)):
    _assert_same(a, b)


def test_each_epoch_is_a_new_permutation_of_the_whole_split(shapes_data_dir):
  mesh = sharding.create_mesh((8, 1))
  config = _data_config(shapes_data_dir, random_crop=False, random_flip=False, label_keys=())
  it = create_input_iterator(config, global_batch_size=128, mesh=mesh, rules=RULES)
  epochs = [np.concatenate([b["image"] for b in _take_n(it, 4)]) for _ in range(2)]
  it.close()
  keys = [collections.Counter(x.tobytes() for x in e) for e in epochs]
  assert sum(keys[0].values()) == 512 and keys[0] == keys[1]  # every example once per epoch
  assert not np.array_equal(epochs[0], epochs[1])  # in another order


def _take_n(iterator, n):
  return [jax.device_get(next(iterator)) for _ in range(n)]


def test_batch_that_does_not_split_over_the_mesh_is_refused(shapes_data_dir):
  mesh = sharding.create_mesh((2, 4))
  with pytest.raises(ValueError, match="global batch size 12 is not divisible by the 8"):
    create_input_iterator(
      _data_config(shapes_data_dir), global_batch_size=12, mesh=mesh, rules=RULES
    )


def test_unknown_split_is_named(shapes_data_dir):
  mesh = sharding.create_mesh((8, 1))
  with pytest.raises(ValueError, match="config.data.split='tain'"):
    create_input_iterator(
      _data_config(shapes_data_dir, split="tain"), global_batch_size=8, mesh=mesh, rules=RULES
    )


class CorruptCaptions(tfds.core.GeneratorBasedBuilder):
  """Sixteen captioned JPEGs of assorted sizes, two of which are not images at all."""

  VERSION = tfds.core.Version("1.0.0")
  CORRUPT = (3, 7)

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "caption": tfds.features.Text(),
        }
      )
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(16):
      if i in self.CORRUPT:
        encoded = b"\xff\xd8 definitely not a jpeg " + bytes(rng.integers(0, 255, 64, np.uint8))
      else:
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        pixels = rng.integers(0, 255, (size[1], size[0], 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        encoded = buffer.getvalue()
      yield i, {"image": encoded, "caption": f"image number {i}"}


def test_undecodable_images_are_skipped_and_counted(tmp_path):
  mesh = sharding.create_mesh((8, 1))
  config = _data_config(str(tmp_path), dataset="corrupt_captions", label_keys=(), resolution=16)
  it = create_input_iterator(config, global_batch_size=8, mesh=mesh, rules=RULES, train=False)
  batches = [jax.device_get(b) for b in it]
  assert len(batches) == 1  # 16 examples, 2 skipped: one full batch of 8 (6 left over)
  assert batches[0]["image"].shape == (8, 16, 16, 3)
  assert it.num_skipped == len(CorruptCaptions.CORRUPT)


def test_process_rows_reassemble_the_one_process_global_batches():
  base = grain.MapDataset.range(44)  # 5 whole batches of 8; the last 4 examples are dropped
  whole = list(ProcessRowsMapDataset(base, 8, 0, 1))
  parts = [list(ProcessRowsMapDataset(base, 8, p, 2)) for p in range(2)]
  rebuilt = [x for k in range(5) for part in parts for x in part[4 * k : 4 * (k + 1)]]
  assert rebuilt == whole == list(range(40))

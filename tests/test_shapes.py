"""The embedded `shapes` dataset: a real TFDS dataset whose captions and labels agree."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from md_jax.data import shapes_scene


def _examples(data_dir, split):
  ds = tfds.load("shapes/r32_small", data_dir=data_dir, split=split)
  return list(tfds.as_numpy(ds))


def test_tfds_load_works_and_labels_match_captions(shapes_data_dir):
  builder = tfds.builder("shapes/r32_small", data_dir=shapes_data_dir)
  examples = _examples(shapes_data_dir, "train")
  assert len(examples) == builder.info.splits["train"].num_examples == 512
  assert builder.info.splits["validation"].num_examples == 128
  features = builder.info.features
  for ex in examples:
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    labels = {key: features[key].int2str(ex[key]) for key in shapes_scene.LABEL_NAMES}
    assert shapes_scene.parse_caption(ex["caption"].decode()) == labels


def test_attributes_cover_the_vocabulary(shapes_data_dir):
  examples = _examples(shapes_data_dir, "train")
  for key, names in shapes_scene.LABEL_NAMES.items():
    seen = {int(ex[key]) for ex in examples}
    assert seen == set(range(len(names))), f"{key}: saw {sorted(seen)} of {len(names)}"
  assert len(shapes_scene.KINDS) >= 4 and len(shapes_scene.COLORS) >= 8


def test_scenes_are_deterministic_and_splits_differ():
  def scene(split_seed, index):
    return shapes_scene.sample_scene(np.random.default_rng([split_seed, index]))

  assert scene(0, 7) == scene(0, 7)
  np.testing.assert_array_equal(
    shapes_scene.render(scene(0, 7), 48), shapes_scene.render(scene(0, 7), 48)
  )
  assert [scene(0, i) for i in range(20)] != [scene(1, i) for i in range(20)]


def test_render_draws_the_named_colour_where_the_caption_says():
  shape = shapes_scene.Shape("square", "red", "large")
  scene = shapes_scene.Scene((shape,), "left", "white", ((0.0, 0.0),))
  image = shapes_scene.render(scene, 64).astype(int)
  red = np.all(np.abs(image - shapes_scene.COLORS["red"]) < 10, axis=-1)
  columns = np.nonzero(red.any(axis=0))[0]
  assert red.sum() > 100
  assert columns.max() < 32, "a shape 'on the left' must lie in the left half"
  assert scene.caption == "a large red square on the left on a white background"


@pytest.mark.parametrize("caption", ["a red circle", "a small red circle on a white", ""])
def test_parse_caption_rejects_other_text(caption):
  with pytest.raises(ValueError, match="not a shapes caption"):
    shapes_scene.parse_caption(caption)

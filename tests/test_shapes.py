"""The embedded `shapes` dataset: a real TFDS dataset whose captions and labels agree."""

import dataclasses

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


def _label_ids(scene):
  return {k: np.array([shapes_scene.LABEL_NAMES[k].index(v)]) for k, v in scene.labels.items()}


def test_canonical_labels_agree_for_both_captions_of_one_two_shape_image():
  rng = np.random.default_rng(0)
  mirrors = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
  seen = 0
  for _ in range(200):
    scene = shapes_scene.sample_scene(rng)
    canonical = shapes_scene.canonical_labels(_label_ids(scene))
    position = shapes_scene.POSITIONS[int(canonical["position"][0])]
    assert position not in ("right of", "below")
    if len(scene.shapes) == 1:  # nothing to reorder
      assert {k: int(v[0]) for k, v in canonical.items()} == {
        k: int(v[0]) for k, v in _label_ids(scene).items()
      }
      continue
    seen += 1
    # The same picture, captioned naming the other shape first.
    other = dataclasses.replace(
      scene, shapes=scene.shapes[::-1], position=mirrors[scene.position],
      jitter=scene.jitter[::-1],
    )  # fmt: skip
    other_canonical = shapes_scene.canonical_labels(_label_ids(other))
    assert {k: int(v[0]) for k, v in canonical.items()} == {
      k: int(v[0]) for k, v in other_canonical.items()
    }, (scene.caption, other.caption)
  assert seen > 50

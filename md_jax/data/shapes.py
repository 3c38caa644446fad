"""The embedded `shapes` dataset: a TFDS builder that draws captioned scenes locally.

    import md_jax.data.shapes  # registers the builder
    tfds.load("shapes/r64", data_dir=...)

Every example is a deterministic function of (split, index), so two machines that build the same
config get identical datasets. `md_jax.data.prepare.prepare_dataset` also writes an ArrayRecord
copy, so `tfds.data_source` reads it by index (what the input pipeline uses for exact resume).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from md_jax.data import shapes_scene

_SPLIT_SEEDS = {"train": 0, "validation": 1}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  resolution: int = 64
  num_train: int = 20_000
  num_validation: int = 1_000


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Captioned images of one or two coloured shapes, with every caption attribute as a label."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    ShapesConfig(name="r64", resolution=64, num_train=20_000),
    ShapesConfig(name="r128", resolution=128, num_train=20_000),
    ShapesConfig(name="r256", resolution=256, num_train=10_000),
    ShapesConfig(name="r512", resolution=512, num_train=2_000, num_validation=500),
    # For tests: builds in a few seconds.
    ShapesConfig(name="r32_small", resolution=32, num_train=512, num_validation=128),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    res = self.builder_config.resolution
    if not 8 <= res <= 512:
      raise ValueError(f"shapes resolution must be in [8, 512], got {res}")
    labels = {
      key: tfds.features.ClassLabel(names=list(names))
      for key, names in shapes_scene.LABEL_NAMES.items()
    }
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
          "caption": tfds.features.Text(),
          **labels,
        }
      ),
      supervised_keys=("image", "caption"),
      description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is drawn here
    cfg = self.builder_config
    return {
      "train": self._generate_examples("train", cfg.num_train),
      "validation": self._generate_examples("validation", cfg.num_validation),
    }

  def _generate_examples(self, split: str, count: int):
    resolution = self.builder_config.resolution
    for index in range(count):
      rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
      scene = shapes_scene.sample_scene(rng)
      yield (
        index,
        {
          "image": shapes_scene.render(scene, resolution),
          "caption": scene.caption,
          **scene.labels,
        },
      )

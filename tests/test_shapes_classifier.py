"""The `shapes` attribute classifier learns from the labels, through the shared trainer."""

import pathlib

import pytest

from md_jax import config_utils
from md_jax.training import shapes_classifier, trainer
from tests.test_vae import _scalars

REPO = pathlib.Path(__file__).parents[1]


def test_classifier_accuracy_rises_above_chance(shapes_data_dir, tmp_path):
  config = config_utils.load_config(REPO / "configs/shapes_classifier.py:tiny")
  config.data.data_dir = shapes_data_dir
  config.data.num_threads = 2
  config.report_every_secs = 1000
  stage = shapes_classifier.ShapesClassifierStage(config)
  trainer.train_and_evaluate(config, str(tmp_path), stage)
  accuracy = [v for _, v in _scalars(tmp_path, "accuracy")]
  background = [v for _, v in _scalars(tmp_path, "accuracy/background")]
  assert len(accuracy) == 4
  assert accuracy[-1] > accuracy[0] + 0.1, accuracy
  assert background[-1] > 0.5, background  # 4 flat backgrounds: chance is 0.25


def test_classifier_needs_every_label():
  config = config_utils.load_config(REPO / "configs/shapes_classifier.py:tiny")
  config.data.label_keys = ("kind_0",)
  with pytest.raises(ValueError, match=r"label_keys lacks \['background'"):
    shapes_classifier.ShapesClassifierStage(config)

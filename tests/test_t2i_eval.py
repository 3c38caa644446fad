"""`md_jax.evaluation.t2i_eval`: FID and CLIP score over held-out captions, reproducing the shapes
evaluator, resumable, and the same on two processes as on one."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from md_jax.evaluation import metrics, t2i_eval
from md_jax.evaluation.chunks import ChunkStore

REPO = pathlib.Path(__file__).parents[1]
SETTING = t2i_eval.Setting(sampler="ddim", steps=2, cfg=3.0, batch_size=8)


def _shapes_eval_by_hand(run, classifier, *, steps, num_images, batch_size, seed=0):
  """The shapes evaluator's Fréchet distance and accuracy written out directly: generate each
  validation batch, classify generated and real images, scipy's matrix root on np.cov."""
  import jax
  import scipy.linalg

  from md_jax.data.pipeline import create_input_iterator
  from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels
  from md_jax.infra import checkpoints, sharding
  from md_jax.models.shapes_classifier import ShapesClassifier
  from md_jax.pipeline.text_to_image import TextToImage

  cls_config, tree, _ = checkpoints.open_checkpoint(classifier)
  variables = {"params": tree["classifier"]["ema_params"]}
  classify = jax.jit(ShapesClassifier.from_config(cls_config).apply)
  pipeline, params, _, config = TextToImage.from_checkpoint(str(run))
  data = config.data.copy_and_resolve_references()
  data.split, data.resolution = "validation", cls_config.data.resolution
  data.label_keys = tuple(LABEL_NAMES)
  mesh = sharding.create_mesh((-1, 1))
  iterator = create_input_iterator(
    data, global_batch_size=batch_size, mesh=mesh, rules=sharding.logical_axis_rules(None),
    train=False,
  )  # fmt: skip
  fake, real, correct = [], [], []
  for i, batch in zip(range(num_images // batch_size), iterator):
    images = pipeline.generate(
      params, batch["tokens"], seed=jax.random.fold_in(jax.random.key(seed), i),
      resolution=data.resolution, steps=steps,
    )  # fmt: skip
    logits, features = classify(variables, np.asarray(images, np.float32) / 127.5 - 1)
    labels = canonical_labels({k: np.asarray(batch[k]) for k in LABEL_NAMES})
    correct.append([np.asarray(logits[k]).argmax(-1) == labels[k] for k in LABEL_NAMES])
    fake.append(np.asarray(features))
    real.append(np.asarray(classify(variables, batch["image"])[1]))
  iterator.close()
  a, b = np.concatenate(fake).astype(np.float64), np.concatenate(real).astype(np.float64)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(cov_a @ cov_b).real
  distance = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * root)
  return distance, float(np.mean(np.concatenate(correct, axis=1)))


def test_shapes_classifier_features_reproduce_the_shapes_figures(
  diffusion_run, classifier_run, tmp_path
):
  from md_jax.evaluation import shapes_eval

  distance, accuracy = _shapes_eval_by_hand(
    diffusion_run, classifier_run, steps=2, num_images=16, batch_size=8
  )
  expected = shapes_eval.evaluate(
    str(diffusion_run), classifier_run, steps=2, num_images=16, batch_size=8
  )
  np.testing.assert_allclose(expected["frechet_distance"], distance, rtol=1e-6)
  np.testing.assert_allclose(expected["overall_accuracy"], accuracy, rtol=1e-12)
  setting = t2i_eval.Setting(sampler="ddim", steps=2, cfg=3.0, batch_size=8, resolution=32)
  found = t2i_eval.evaluate(
    str(diffusion_run), setting=setting, num_images=16, fid_network="shapes_classifier",
    classifier=classifier_run, out=str(tmp_path / "eval"),
  )  # fmt: skip
  np.testing.assert_allclose(found["frechet_distance"], distance, rtol=1e-6)
  assert found["accuracy"] == expected["accuracy"]
  assert found["real_overall_accuracy"] == expected["real_overall_accuracy"]


def _evaluate(run, out, reference_dir):
  return t2i_eval.evaluate(
    str(run), setting=SETTING, num_images=16, fid_weights="random", clip="random", out=str(out),
    reference_dir=str(reference_dir),
  )  # fmt: skip


_FIGURES = ("frechet_distance", "clip_score", "clip_cosine", "num_images")


@pytest.fixture(scope="module")
def uninterrupted(diffusion_run, tmp_path_factory):
  """(result, reference dir) of one whole evaluation: random Inception and CLIP, 16 captions."""
  root = tmp_path_factory.mktemp("t2i_eval")
  return _evaluate(diffusion_run, root / "whole", root / "reference"), root / "reference"


def test_an_evaluation_stopped_halfway_resumes_to_the_same_figures(
  diffusion_run, uninterrupted, tmp_path, monkeypatch
):
  whole, reference = uninterrupted
  assert len(list(reference.glob("*.npz"))) == 1  # the real images' statistics, cached
  assert whole["num_images"] == 16 and whole["fid_reference_images"] == 16
  assert whole["frechet_distance"] > 0 and 0 <= whole["clip_score"] <= 100
  assert "clean-fid" in whole["fid_features"]

  write = ChunkStore.write

  def preempted_after_the_first_chunk(self, index, arrays, state):
    if index == 1:
      raise KeyboardInterrupt("preempted")
    write(self, index, arrays, state)

  monkeypatch.setattr(ChunkStore, "write", preempted_after_the_first_chunk)
  with pytest.raises(KeyboardInterrupt):
    _evaluate(diffusion_run, tmp_path / "stopped", reference)
  assert ChunkStore(tmp_path / "stopped" / "chunks").completed() == 1
  monkeypatch.setattr(ChunkStore, "write", write)
  # Resumed with the cached reference: no real image is read again, and the figures are the same.
  monkeypatch.setattr(metrics.FrechetDistance, "on_real", None)
  resumed = _evaluate(diffusion_run, tmp_path / "stopped", reference)
  for key in _FIGURES:
    np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-9, err_msg=key)

  with pytest.raises(ValueError, match="holds an evaluation with other settings"):
    t2i_eval.evaluate(
      str(diffusion_run), setting=SETTING, num_images=24, fid_weights="random",
      out=str(tmp_path / "stopped"), reference_dir=str(reference),
    )  # fmt: skip


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(diffusion_run, uninterrupted, tmp_path):
  one, _ = uninterrupted
  port = t2i_eval_port()
  xla_flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  command = [
    sys.executable, "-m", "md_jax.evaluation.t2i_eval", f"--workdir={diffusion_run}",
    "--sampler=ddim", "--steps=2", "--cfg=3", "--batch_size=8", "--num=16",
    "--fid_weights=random", "--clip=random", f"--out={tmp_path / 'two'}",
    f"--reference_dir={tmp_path / 'reference_two'}", "--distributed",
    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
  ]  # fmt: skip
  processes = [
    subprocess.Popen(
      [*command, f"--process_id={i}"],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=900)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]
  two, other = (json.loads(out.strip().splitlines()[-1]) for out in outputs)
  for key in _FIGURES:
    assert other[key] == two[key], key  # every process reports the same figures
    np.testing.assert_allclose(two[key], one[key], rtol=1e-6, err_msg=key)


def t2i_eval_port() -> int:
  from tests.test_multihost import _free_port

  return _free_port()


def test_evals_while_training_log_the_figures_the_evaluator_prints(shapes_data_dir, tmp_path):
  from tests.test_trainer import _config, _train
  from tests.test_vae import _scalars

  config = _config(shapes_data_dir, total_steps=2)
  config.evals.fid.update(
    every=2, num=8, batch_size=8, steps=2, fid_weights="random",
    reference_dir=str(tmp_path / "reference"),
  )  # fmt: skip
  _train(config, tmp_path / "run")
  logged = dict(_scalars(tmp_path / "run", "eval/fid/frechet_distance"))
  assert list(logged) == [2]
  assert (tmp_path / "run" / "eval" / "fid" / "00000002" / "chunks").is_dir()
  printed = t2i_eval.evaluate(
    str(tmp_path / "run"), setting=t2i_eval.Setting(sampler="ddim", steps=2, batch_size=8),
    num_images=8, fid_weights="random", reference_dir=str(tmp_path / "reference"),
  )  # fmt: skip
  np.testing.assert_allclose(logged[2], printed["frechet_distance"], rtol=1e-5)


def test_a_bad_evals_entry_is_one_error_naming_it(shapes_data_dir):
  from md_jax.evaluation import periodic
  from tests.test_trainer import _config

  config = _config(shapes_data_dir)
  config.evals.shapes.every = 100
  config.evals.shapes.classifier = "/nowhere/classifier"
  with pytest.raises(ValueError, match=r"config.evals.shapes.classifier='/nowhere/classifier'"):
    periodic.check(config)
  config.evals.shapes.every = 0
  config.evals.fid.kind = "inception"
  with pytest.raises(ValueError, match=r"config.evals.fid.kind='inception'"):
    periodic.check(config)


def test_a_cfg_sweep_draws_fid_against_clip_score(tmp_path):
  from PIL import Image

  results = [
    {"cfg": cfg, "frechet_distance": fid, "clip_score": clip, "num_images": 16}
    for cfg, fid, clip in ((1.5, 30.0, 20.0), (3.0, 25.0, 24.0), (6.0, 28.0, 26.0))
  ]
  t2i_eval.plot_sweep(results, tmp_path / "sweep" / "sweep.png")
  image = Image.open(tmp_path / "sweep" / "sweep.png")
  assert image.format == "PNG" and min(image.size) > 100

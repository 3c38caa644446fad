"""An exported one-step pipeline scored like the JAX model (`artifact_pipeline`, `shapes_eval
--artifact`): its images are the JAX model's for the same captions and seed, up to the runtime's
rounding, which is what makes their accuracy figures comparable."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.evaluation import shapes_eval
from md_jax.evaluation.artifact_pipeline import ArtifactPipeline, to_pixels
from md_jax.export import bundle, programs
from md_jax.pipeline.text_to_image import TextToImage, to_uint8

PROMPTS = [
  "a large red circle left of a small blue square",
  "a small green triangle on a white background",
  "a large yellow square",
]


@pytest.fixture(scope="module")
def exported(diffusion_run, tmp_path_factory):
  """The tiny run's one-step pipeline at batch 1, LiteRT fp32 only (one conversion), at the
  run's final resolution (32 px, the classifier's), and its decoder beside it."""
  out = tmp_path_factory.mktemp("artifact_eval")
  source = programs.source_from_checkpoint(str(diffusion_run))
  bundle.export_all(
    source, out, kinds=("one_step", "decoder"), batches=(1,), formats=("litert_fp32",)
  )
  return out


@pytest.fixture(scope="module")
def model(diffusion_run):
  pipeline, params, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  return pipeline, params


def test_to_pixels_quantises_as_the_jax_pipeline_does():
  """The artifact's [0, 1] image → uint8 equals `to_uint8` of the decoded [−1, 1] image, bit for
  bit, at and beside every rounding boundary and outside the range."""
  boundaries = (np.arange(-2, 258, dtype=np.float64) + 0.5) / 127.5 - 1.0
  d = np.float32(boundaries)[:, None]
  steps = np.arange(-4, 5)  # the float32 values a few ulps either side of each boundary
  d = np.concatenate([
    (d + steps * np.spacing(d)).ravel(),
    np.random.default_rng(0).uniform(-1.05, 1.05, 100_000),
  ]).astype(np.float32)  # fmt: skip
  jax_pixels = np.asarray(jax.jit(to_uint8)(jnp.asarray(d)))
  artifact_pixels = to_pixels(jax.jit(programs._to_image)(jnp.asarray(d)))
  np.testing.assert_array_equal(artifact_pixels, jax_pixels)


def test_the_artifact_draws_the_jax_models_images(exported, model):
  pipeline, params = model
  artifact = ArtifactPipeline.load(exported / "one_step_b1/fp32.tflite", pipeline)
  assert (artifact.format, artifact.batch, artifact.resolution) == ("litert_fp32", 1, 32)
  key = jax.random.fold_in(jax.random.key(0), 5)  # as the evaluation loop keys a batch
  tokens = pipeline.tokenize(PROMPTS)
  expected = np.asarray(pipeline.generate(params, tokens, seed=key, sampler="ufogen", steps=1))
  images = np.asarray(artifact.generate(params, tokens, seed=key, sampler="ufogen", steps=1))
  assert images.shape == expected.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  difference = np.abs(images.astype(int) - expected)
  assert difference.max() <= 2, difference.max()
  assert np.mean(difference > 0) < 0.01  # float32 in both: almost every pixel is the same
  # Another seed is another image: the noise, not only the captions, follows the key.
  other = np.asarray(artifact.generate(params, tokens, seed=jax.random.key(1)))
  assert np.abs(other.astype(int) - images).max() > 10


def test_rows_run_in_chunks_of_the_artifacts_batch_and_keep_their_own_noise(exported, model):
  """A batch-2 artifact given 3 rows: the last chunk is padded, and each row's image is the one
  its own noise gives, as if run alone."""
  artifact = ArtifactPipeline.load(exported / "one_step_b1/fp32.tflite", model[0])
  fed = []
  squash = lambda noise: 1 / (1 + np.exp(-noise.mean(axis=(1, 2, 3))))  # a row's noise → [0, 1]

  def run(feed):  # an "artifact" whose image is a function of each row's noise alone
    assert feed["token_ids"].shape == (2, 77) and feed["noise"].shape == (2, 8, 8, 8)
    fed.append(len(feed["noise"]))
    return np.broadcast_to(squash(feed["noise"])[:, None, None, None], (2, 32, 32, 3))

  two = ArtifactPipeline(**{**artifact.__dict__, "batch": 2, "run": run})
  images = np.asarray(two.generate(None, PROMPTS, seed=3))
  assert fed == [2, 2] and images.shape == (3, 32, 32, 3)
  noise = np.asarray(jax.random.normal(jax.random.key(3), (3, 8, 8, 8)))  # TextToImage's draw
  np.testing.assert_array_equal(images[:, 0, 0, 0], to_pixels(squash(noise)))
  assert len(set(images[:, 0, 0, 0])) == 3


def test_a_setting_or_artifact_the_one_step_program_cannot_run_is_one_error(exported, model):
  pipeline, params = model
  path = exported / "one_step_b1/fp32.tflite"
  artifact = ArtifactPipeline.load(path, pipeline)
  tokens = pipeline.tokenize(PROMPTS[:1])
  for sampler, steps in (("ddim", 1), ("ufogen", 4)):
    with pytest.raises(ValueError, match=rf"--artifact={path}: .* not '{sampler}' with {steps}"):
      artifact.generate(params, tokens, sampler=sampler, steps=steps)
  with pytest.raises(ValueError, match="exported at 32 px; asked for 64 px"):
    artifact.generate(params, tokens, sampler="ufogen", steps=1, resolution=64)
  decoder = exported / "decoder_b1/fp32.tflite"
  with pytest.raises(ValueError, match=rf"--artifact={decoder}: a 'decoder' program; .*one_step"):
    ArtifactPipeline.load(decoder, pipeline)
  with pytest.raises(ValueError, match=r"a 'mlirbc' file; expected one of"):
    ArtifactPipeline.load(exported / "one_step_b1/model.mlirbc", pipeline)
  with pytest.raises(FileNotFoundError, match="no such file"):
    ArtifactPipeline.load(exported / "one_step_b1/int8.tflite", pipeline)


def test_shapes_eval_scores_the_artifact_and_names_it(exported, diffusion_run, classifier_run):
  """The evaluator with `artifact=`: the JAX model's figures, up to pixels that differ by a
  level, and the artifact and its format in the result; a wrong setting stops before the loop."""
  kwargs = dict(sampler="ufogen", steps=1, num_images=8, batch_size=8)
  path = str(exported / "one_step_b1/fp32.tflite")
  jax_result = shapes_eval.evaluate(str(diffusion_run), classifier_run, **kwargs)
  result = shapes_eval.evaluate(str(diffusion_run), classifier_run, artifact=path, **kwargs)
  assert (result["artifact"], result["format"]) == (path, "litert_fp32")
  assert result["artifact_source"]["step"] == jax_result["checkpoint_step"] == 2
  assert result["num_images"] == 8
  assert abs(result["overall_accuracy"] - jax_result["overall_accuracy"]) <= 2 / (8 * 9)
  assert result["frechet_distance"] == pytest.approx(jax_result["frechet_distance"], rel=1e-2)
  with pytest.raises(ValueError, match="the exported one-step pipeline is sampler 'ufogen'"):
    shapes_eval.evaluate(str(diffusion_run), classifier_run, artifact=path, steps=2)


def test_rows_of_one_model_are_not_resumed_by_another(tmp_path):
  out = tmp_path / "rows"
  shapes_eval.check_artifact_out(out, "a/one_step_b1/fp32.tflite")  # a fresh --out: named
  shapes_eval.check_artifact_out(out, "a/one_step_b1/fp32.tflite")  # the same artifact resumes
  with pytest.raises(ValueError, match=r"holds the rows of .*fp32.tflite, not of .*int8"):
    shapes_eval.check_artifact_out(out, "a/one_step_b1/int8.tflite")
  with pytest.raises(ValueError, match="not of the JAX model"):
    shapes_eval.check_artifact_out(out, None)
  jax_rows = tmp_path / "jax"
  jax_rows.mkdir()
  (jax_rows / "settings.json").write_text(json.dumps({}))
  shapes_eval.check_artifact_out(jax_rows, None)
  with pytest.raises(ValueError, match="holds the rows of the JAX model"):
    shapes_eval.check_artifact_out(jax_rows, "a/one_step_b1/fp32.tflite")

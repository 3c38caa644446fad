"""Classifier guidance: the sampler wrapper, the noise-aware latent classifier stage, its guide."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.diffusion import samplers, schedules

REPO = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_guidance_moves_the_noise_estimate_by_minus_scale_sigma_grad_for_every_target(prediction):
  schedule = schedules.scaled_linear()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
  out = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  mu = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  log_prob = lambda x, t: -0.5 * jnp.sum(jnp.square(x - mu), axis=(1, 2, 3))  # ∇ = μ − x
  t = jnp.array([100, 500, 900])
  guided = samplers.classifier_guidance(
    lambda x, t: out, log_prob, schedule, prediction=prediction, scale=2.0, max_timestep=600
  )(x, t)
  _, eps = schedule.to_x0_and_eps(out, x, t, prediction)
  _, eps_guided = schedule.to_x0_and_eps(guided, x, t, prediction)
  _, sigma = schedule.alpha_sigma(t, x)
  expected = eps - 2.0 * sigma * (mu - x)
  np.testing.assert_allclose(eps_guided[:2], expected[:2], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(guided[2], out[2])  # t = 900 > max_timestep: not guided


def test_classifier_guided_ddim_lands_where_the_classifier_believes_the_asked_class():
  # N(0, I) data: its ideal v-denoiser is 0. A linear two-class classifier on the mean latent.
  schedule = schedules.scaled_linear()
  w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, 2)), jnp.float32)
  labels = jnp.array([0, 0, 1, 1])

  def log_prob(x, t):
    score = jnp.sum(x * w, axis=(1, 2, 3))
    logits = jnp.stack([score, -score], -1)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]

  x_T = jax.random.normal(jax.random.key(0), (4, 4, 4, 2))
  sample = lambda scale: samplers.ddim_sample(
    samplers.classifier_guidance(
      lambda x, t: jnp.zeros_like(x), log_prob, schedule, prediction="v", scale=scale,
      max_timestep=999,
    ),
    schedule, x_T, 20, prediction="v",
  )  # fmt: skip
  plain, guided = sample(1e-9), sample(3.0)
  zero = jnp.zeros((4,), jnp.int32)
  assert np.all(np.asarray(log_prob(guided, zero)) > np.asarray(log_prob(plain, zero)) + 1.0)


def test_latent_classifier_learns_the_attributes_from_noised_latents(latent_classifier_run):
  from tests.test_vae import _scalars

  loss = [v for _, v in _scalars(latent_classifier_run, "loss")]
  background = [v for _, v in _scalars(latent_classifier_run, "accuracy/background")]
  assert len(loss) == 4
  assert loss[-1] < loss[0] - 1.0, loss
  assert background[-1] > 0.4, background  # 4 flat backgrounds: chance is 0.25


def test_noised_copies_noise_each_image_draws_times_at_its_own_timesteps():
  from md_jax.training.latent_classifier import noised_copies

  schedule = schedules.scaled_linear()
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  labels = {"kind_0": jnp.array([0, 3, 1])}
  x_t, t, noise, copied = noised_copies(x0, labels, jax.random.key(1), schedule, 799, 2)
  assert x_t.shape == (6, 4, 4, 2) and t.shape == (6,)
  np.testing.assert_array_equal(copied["kind_0"], [0, 0, 3, 3, 1, 1])
  assert int(t.max()) <= 799 and len(set(np.asarray(t).tolist())) > 3
  alpha, sigma = schedule.alpha_sigma(t, x_t)
  recovered = (x_t - sigma * noise) / alpha  # each row is its own image, noised afresh
  np.testing.assert_allclose(recovered, jnp.repeat(x0, 2, axis=0), atol=1e-4)
  assert float(jnp.abs(noise[0] - noise[1]).max()) > 0.1


def test_latent_classifier_rejects_bad_timestep_bounds_and_draws():
  from md_jax import config_utils
  from md_jax.training import latent_classifier

  config = config_utils.load_config(REPO / "configs/latent_classifier.py:tiny")
  config.max_timestep = 1000
  with pytest.raises(ValueError, match=r"config.max_timestep=1000: expected 0 … 999"):
    latent_classifier.LatentClassifierStage(config)
  config.max_timestep, config.noise_draws = 799, 0
  with pytest.raises(ValueError, match=r"config.noise_draws=0: expected ≥ 1"):
    latent_classifier.LatentClassifierStage(config)


def test_the_guide_checks_its_run_against_the_diffusion_model_and_steers_generation(
  latent_classifier_run, diffusion_run
):
  from md_jax import generate
  from md_jax.data.shapes_scene import LABEL_NAMES, caption_label_ids
  from md_jax.pipeline.classifier_guidance import load_guide
  from tests.test_diffusion import _tiny_stage

  stage, state = _tiny_stage()  # projection latents, f=4, c=8, SD's schedule: the tiny guide's
  pipeline = stage.pipeline
  run = str(latent_classifier_run)
  assert load_guide(None, pipeline, scale=0.0) is None
  with pytest.raises(ValueError, match="needs both"):
    load_guide(None, pipeline, scale=3.0)
  with pytest.raises(ValueError, match="needs both"):
    load_guide(run, pipeline, scale=0.0)
  with pytest.raises(ValueError, match=r"is a 'diffusion' checkpoint; expected one of \('latent_c"):
    load_guide(str(diffusion_run), pipeline, scale=3.0)
  cosine_stage, _ = _tiny_stage(schedule={"kind": "cosine", "num_steps": 1000})
  with pytest.raises(ValueError, match="another noise schedule"):
    load_guide(run, cosine_stage.pipeline, scale=3.0)
  scaled_stage, _ = _tiny_stage(latents={**stage.config.latents.to_dict(), "scale": 2.0})
  with pytest.raises(ValueError, match="not the same latent space"):
    load_guide(run, scaled_stage.pipeline, scale=3.0)

  prompts = [
    "a large red circle in the center on a white background",
    "a small blue star right of a large green square on a black background",
  ]
  guide = load_guide(run, pipeline, scale=30.0).with_labels(caption_label_ids(prompts))
  assert set(guide.labels) == set(LABEL_NAMES) and guide.max_timestep == 799  # every attribute
  np.testing.assert_array_equal(guide.labels["kind_0"], [0, 1])  # canonical: the square first
  unet = jax.tree.map(lambda p: p + 0.05, state.unet.params)
  params = state.inference_params().replace(unet=unet)
  tokens = jnp.asarray(pipeline.tokenize(prompts))
  make = lambda resolution=32, **kw: np.asarray(pipeline.generate(
    params, tokens, seed=jax.random.key(0), resolution=resolution, steps=4, **kw
  ))  # fmt: skip
  assert np.abs(make(classifier_guide=guide).astype(int) - make()).max() > 1
  with pytest.raises(ValueError, match=r"reads \(8, 8, 8\) latents, and resolution 16 gives"):
    make(resolution=16, classifier_guide=guide)
  with pytest.raises(ValueError, match="ufogen takes none"):
    make(sampler="ufogen", classifier_guide=guide)

  # The generate CLI's function reads each prompt's attributes by the `shapes` grammar.
  guided = functools.partial(
    generate.generate, str(diffusion_run), steps=2, resolution=32, latent_classifier=run,
    classifier_scale=30.0,
  )  # fmt: skip
  images, settings = guided(prompts)
  assert images.shape == (2, 32, 32, 3) and settings["latent_classifier"] == run
  assert settings["classifier_scale"] == 30.0
  with pytest.raises(ValueError, match="not a shapes caption: 'a red thing'"):
    guided(["a red thing"])


def _label_batch(pipeline, prompts, resolution):
  """A batch of `prompts` with their attribute labels, as the `shapes` pipeline yields them;
  tokenized by the `TextToImage` pipeline's tokenizer."""
  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.data.shapes_scene import LABEL_NAMES, parse_caption

  named = [parse_caption(p) for p in prompts]
  labels = {
    key: np.asarray([names.index(n[key]) for n in named], np.int32)
    for key, names in LABEL_NAMES.items()
  }
  images = jax.random.uniform(jax.random.key(1), (len(prompts), resolution, resolution, 3))
  tokens = tokenizer_lib.tokenize(pipeline.tokenizer, prompts)
  return {"image": images * 2 - 1, "tokens": jnp.asarray(tokens), **labels}


PROMPTS = (
  "a large red circle in the center on a white background",
  "a small blue star right of a large green square on a black background",
  "a small yellow triangle at the top on a gray background",
  "a large purple square on the left on a beige background",
)


def test_ufogen_classifier_term_reaches_g_through_the_fake_sample(
  shapes_data_dir, diffusion_run, latent_classifier_run
):
  from md_jax.data.shapes_scene import LABEL_NAMES
  from md_jax.training import ufogen
  from tests.test_ufogen import _changed, _initial_state, _ufogen_config

  # Only the classifier term left: G must still move, through x'_{t'} = q(x_{t'} | G(x_t)).
  config = _ufogen_config(
    shapes_data_dir, diffusion_run, reconstruction_weight=0.0, adversarial_weight=0.0,
    classifier={"checkpoint": str(latent_classifier_run), "weight": 1.0},
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"config.data.label_keys lacks"):
    ufogen.UFOGenStage(config)
  config.data.label_keys = tuple(LABEL_NAMES)
  stage = ufogen.UFOGenStage(config)
  state, _ = _initial_state(stage, diffusion_run)
  jax.tree.map(np.testing.assert_array_equal, state.frozen["classifier"], stage.classifier.params)
  batch = _label_batch(stage.pipeline, PROMPTS * 2, resolution=32)
  moved, metrics = jax.jit(stage.train_step)(state, batch)
  assert any(_changed(state.unet.params, moved.unet.params))
  config.ufogen.classifier.weight = 0.0  # nothing moves G now
  still, metrics = jax.jit(ufogen.UFOGenStage(config).train_step)(state, batch)
  assert "classifier" not in metrics and not any(_changed(state.unet.params, still.unet.params))

  config.ufogen.classifier.weight, config.ufogen.jump = 1.0, 100  # t' up to 899 > 799
  with pytest.raises(ValueError, match=r"reads t' ≤ 799, and jump 100 gives t' up to 899"):
    ufogen.UFOGenStage(config)
  config.ufogen.jump, config.data.resolution = 750, 64  # 16×16 latents: not the classifier's
  with pytest.raises(ValueError, match=r"reads \(8, 8, 8\) latents, and no phase .* \[64\]"):
    ufogen.UFOGenStage(config)

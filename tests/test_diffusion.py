"""Noise schedules, prediction-target conversions and the DDIM sampler."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.diffusion import samplers, schedules
from md_jax.diffusion.schedules import min_snr_weight

REPO = pathlib.Path(__file__).parents[1]


def test_scaled_linear_matches_stable_diffusion():
  abar = np.asarray(schedules.scaled_linear().alphas_cumprod)
  np.testing.assert_allclose(abar[0], 1 - 0.00085, rtol=1e-6)  # β_1 = 0.00085
  # SD's terminal √ᾱ_T = 0.068265, as quoted by Lin et al. 2024 ("Common Diffusion Noise
  # Schedules and Sample Steps are Flawed", Table 1).
  np.testing.assert_allclose(np.sqrt(abar[-1]), 0.068265, rtol=1e-4)
  assert np.all(np.diff(abar) < 0)


def test_cosine_is_decreasing_and_positive():
  abar = np.asarray(schedules.cosine().alphas_cumprod)
  assert np.all(np.diff(abar) < 0) and abar[-1] > 0 and abar[0] > 0.999


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_targets_convert_back_to_x0_and_noise(prediction):
  schedule = schedules.scaled_linear()
  x0 = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 10, 500, 999])
  x_t = schedule.add_noise(x0, noise, t)
  target = {"eps": noise, "v": schedule.v_target(x0, noise, t), "x0": x0}[prediction]
  x0_hat, eps_hat = schedule.to_x0_and_eps(target, x_t, t, prediction)
  # x0 from ε divides by √ᾱ_t (≈0.07 at t=999), so allow for float32 round-off there.
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


# Cosine is paired with v: its ᾱ_T ≈ 2e-9 (zero terminal SNR), so x_T is all noise and ε cannot
# give x0 back.
SCHEDULE_AND_PREDICTION = [("scaled_linear", "eps"), ("scaled_linear", "v"), ("cosine", "v")]


@pytest.mark.parametrize("kind,prediction", SCHEDULE_AND_PREDICTION)
def test_ddim_with_the_ideal_denoiser_of_one_point_lands_on_it(kind, prediction):
  schedule = getattr(schedules, kind)()
  target = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))

  def ideal(x_t, t):  # the exact prediction when the data distribution is the single point
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    eps = (x_t - alpha * target) / sigma
    return eps if prediction == "eps" else alpha * eps - sigma * target

  x_T = jax.random.normal(jax.random.key(4), target.shape)
  out = samplers.ddim_sample(ideal, schedule, x_T, 20, prediction=prediction)
  np.testing.assert_allclose(out, target, atol=1e-4)


def test_guidance_scale_one_is_the_conditional_model():
  model = lambda x, t, c: x * c.mean(axis=(1, 2))[:, None, None, None] + t[:, None, None, None]
  x, t = jnp.ones((2, 4, 4, 1)), jnp.array([3, 5])
  cond, uncond = jnp.full((2, 7, 3), 2.0), jnp.zeros((2, 7, 3))
  guided = samplers.classifier_free_guidance(model, cond, uncond, 1.0)(x, t)
  np.testing.assert_allclose(guided, model(x, t, cond))
  doubled = samplers.classifier_free_guidance(model, cond, uncond, 2.0)(x, t)
  np.testing.assert_allclose(doubled, 2 * model(x, t, cond) - model(x, t, uncond))


def test_autoguidance_extrapolates_from_the_weaker_model_to_the_better_one():
  good = lambda x, t: 3.0 * x + t[:, None, None, None]
  weak = lambda x, t: x - t[:, None, None, None]
  x, t = jnp.arange(32.0).reshape(2, 4, 4, 1), jnp.array([3, 5])
  np.testing.assert_allclose(samplers.autoguidance(good, weak, 1.0)(x, t), good(x, t))
  np.testing.assert_allclose(samplers.autoguidance(good, good, 4.0)(x, t), good(x, t))
  np.testing.assert_allclose(
    samplers.autoguidance(good, weak, 2.5)(x, t), weak(x, t) + 2.5 * (good(x, t) - weak(x, t))
  )


def test_logit_normal_timesteps_centre_where_the_config_says_and_stay_in_range():
  import ml_collections
  import scipy.special

  config = ml_collections.ConfigDict({"kind": "logit_normal", "logit_mean": -0.5, "logit_std": 1.2})
  t = np.asarray(schedules.sample_timesteps(jax.random.key(0), 20000, 1000, config))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
  # The median of sigmoid(z) is sigmoid(mean); the quartiles those of N(mean, std²).
  quartiles = scipy.special.expit(-0.5 + 1.2 * np.array([-0.6745, 0.0, 0.6745])) * 1000
  np.testing.assert_allclose(np.percentile(t, [25, 50, 75]), quartiles, atol=8)
  uniform = np.asarray(schedules.sample_timesteps(jax.random.key(0), 20000, 1000))
  assert abs(np.median(uniform) - 500) < 15 and uniform.max() == 999
  # The ends, which the uniform density samples a tenth of the time each, get far less.
  assert np.mean(t >= 900) < 0.05 and np.mean(uniform >= 900) > 0.09


@pytest.mark.parametrize(
  "timesteps, match",
  [({"kind": "beta", "logit_mean": 0.0, "logit_std": 1.0}, "timesteps.kind='beta'"),
   ({"kind": "logit_normal", "logit_mean": 0.0, "logit_std": 0.0}, "timesteps.logit_std=0.0")],
)  # fmt: skip
def test_bad_timestep_sampling_config_names_the_key(timesteps, match):
  import ml_collections

  with pytest.raises(ValueError, match=match):
    schedules.sample_timesteps(jax.random.key(0), 4, 1000, ml_collections.ConfigDict(timesteps))


def test_min_snr_weights_cap_the_easy_timesteps():
  snr = jnp.array([0.01, 1.0, 5.0, 100.0])
  np.testing.assert_allclose(min_snr_weight(snr, 5.0, "eps"), [1.0, 1.0, 1.0, 0.05])
  np.testing.assert_allclose(
    min_snr_weight(snr, 5.0, "v"), np.minimum(snr, 5.0) / (snr + 1), rtol=1e-6
  )


def _ideal_single_point(schedule, target, prediction):
  def ideal(x_t, t):  # the exact prediction when the data distribution is the single point
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    eps = (x_t - alpha * target) / sigma
    return eps if prediction == "eps" else alpha * eps - sigma * target

  return ideal


@pytest.mark.parametrize("kind,prediction", SCHEDULE_AND_PREDICTION)
def test_dpm_solver_and_ufogen_with_the_ideal_denoiser_land_on_the_point(kind, prediction):
  schedule = getattr(schedules, kind)()
  target = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
  ideal = _ideal_single_point(schedule, target, prediction)
  x_T = jax.random.normal(jax.random.key(4), target.shape)
  out = samplers.dpm_solver_pp_2m_sample(ideal, schedule, x_T, 10, prediction=prediction)
  np.testing.assert_allclose(out, target, atol=1e-4)
  for steps in (1, 4):
    out = samplers.ufogen_sample(ideal, schedule, x_T, steps, prediction=prediction)
    np.testing.assert_allclose(out, target, atol=1e-4)


def test_dpm_solver_pp_2m_converges_at_second_order_on_the_gaussian_flow_ode():
  """Data N(0, s²): E[x_0|x_t] = α s² x_t / (α² s² + σ²), and the probability-flow ODE keeps
  x_t / √(α_t² s² + σ_t²) constant, so the exact sample is x_T · s / √(α_T² s² + σ_T²).
  4× the steps cut DDIM's error ~4× (first order) and DPM-Solver++(2M)'s ~16× (second order)."""
  schedule, s = schedules.scaled_linear(), 0.5

  def x0_model(x_t, t):
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    return alpha * s**2 * x_t / (alpha**2 * s**2 + sigma**2)

  x_T = jax.random.normal(jax.random.key(0), (64, 8))
  abar_T = schedule.alphas_cumprod[-1]
  exact = x_T * s / jnp.sqrt(abar_T * s**2 + 1 - abar_T)

  def error(sampler, steps):
    return float(jnp.max(jnp.abs(sampler(x0_model, schedule, x_T, steps, prediction="x0") - exact)))

  ddim = [error(samplers.ddim_sample, n) for n in (50, 200)]
  dpm = [error(samplers.dpm_solver_pp_2m_sample, n) for n in (50, 200)]
  assert ddim[1] / ddim[0] > 1 / 6, ddim  # first order
  assert dpm[1] / dpm[0] < 1 / 8, dpm  # second order
  assert dpm[1] < 0.5 * ddim[1], (dpm, ddim)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_gaussian_data_with_its_variance_at_any_eta(eta):
  """Data N(0, s²) and its exact denoiser: DDIM at η = 0 (the ODE) and at η = 1 (fresh noise every
  step, DDPM's posterior variance) must both end with samples of std s, up to their first-order
  discretisation error (at 1000 steps −0.3 % and −1 %; at 50 steps −5 % and −10 %). A wrong noise
  share (too much or too little fresh noise for the deterministic part left) moves the std."""
  schedule, s = schedules.scaled_linear(), 0.5

  def x0_model(x_t, t):
    alpha, sigma = schedule.alpha_sigma(t, x_t)
    return alpha * s**2 * x_t / (alpha**2 * s**2 + sigma**2)

  abar_T = schedule.alphas_cumprod[-1]
  x_T = jax.random.normal(jax.random.key(0), (8192, 4)) * jnp.sqrt(abar_T * s**2 + 1 - abar_T)
  out = samplers.ddim_sample(
    x0_model, schedule, x_T, 1000, prediction="x0", eta=eta, rng=jax.random.key(1)
  )
  assert abs(float(jnp.std(out)) - s) < 0.02 * s, float(jnp.std(out))
  if eta:  # the fresh noise decorrelates the sample from its start
    assert float(jnp.mean(out * x_T)) / (s * float(jnp.std(x_T))) < 0.5


def _tiny_stage(**overrides):
  """The tiny config's stage at 16 px, `overrides` applied to its config, and its initial state."""
  import flax.linen as nn

  from md_jax import config_utils
  from md_jax.training import diffusion

  config = config_utils.load_config(REPO / "configs/diffusion.py:tiny")
  config.data.resolution = 16
  config.update(overrides)
  stage = diffusion.DiffusionStage(config)
  rng = jax.random.key_data(jax.random.key(0))
  return stage, jax.jit(lambda r: nn.meta.unbox(stage.init_state(r)))(rng)


def test_generate_with_the_model_as_its_own_guide_is_unguided_and_ufogen_refuses_a_guide():
  from md_jax.pipeline.checkpoint_layout import InferenceParams

  stage, state = _tiny_stage()
  # Random init leaves the UNet's zero-initialised output at 0: perturb it, so images differ.
  unet = jax.tree.map(lambda p: p + 0.05, state.unet.params)
  params = state.inference_params().replace(unet=unet)
  tokens = jnp.asarray(stage.pipeline.tokenize(["a large red circle"] * 2))
  run = lambda **kw: np.asarray(stage.pipeline.generate(
    params, tokens, seed=jax.random.key(0), resolution=16, steps=4, **kw
  ))  # fmt: skip
  plain = run(cfg=1.0)
  assert np.abs(run(cfg=3.0, guide=params).astype(int) - plain).max() <= 1
  other = InferenceParams(
    unet=jax.tree.map(lambda p: p * 0.5, unet),
    text_encoder=params.text_encoder,
    autoencoder=params.autoencoder,
  )
  assert np.abs(run(cfg=3.0, guide=other).astype(int) - plain).max() > 1
  with pytest.raises(ValueError, match="ufogen takes none"):
    run(sampler="ufogen", guide=params)


@pytest.mark.parametrize("train", [False, True])
def test_the_text_encoder_learns_only_when_configured_to(train):
  from md_jax.training.diffusion import text_encoder_params
  from md_jax.training.train_state import TrainState

  # warmup 0: the first step moves the params.
  stage, state = _tiny_stage(text_encoder={"train": train}, optimizer={"warmup_steps": 0})
  assert isinstance(state.text_encoder, TrainState) == train
  tokens = stage.pipeline.tokenize(["a large red circle in the center"] * 4)
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1, maxval=1)
  # Three steps: the UNet's zero-initialised output layers (the cross-attention's and the
  # transformer's proj_out, one behind the other) pass the text no gradient for the first two.
  step, new_state = jax.jit(stage.train_step), state
  for _ in range(3):
    new_state, metrics = step(new_state, {"image": images, "tokens": tokens})
  before = jax.tree.leaves(text_encoder_params(state.text_encoder, ema=False))
  after = jax.tree.leaves(text_encoder_params(new_state.text_encoder, ema=False))
  changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
  assert all(changed) if train else not any(changed), changed
  assert ("text_grad_norm" in metrics) == train


def test_a_frozen_text_encoders_backward_pass_is_not_traced():
  """Trained jointly, the step's matmul FLOPs hold the text encoder's backward (2× its forward);
  frozen, they do not, so the benchmarks' model-FLOP count is the work the step does."""
  from md_jax.benchmarks.model_flops import jaxpr_flops, model_flops
  from md_jax.training.diffusion import text_encoder_params

  step_flops = {}
  for train in (False, True):
    stage, state = _tiny_stage(text_encoder={"train": train})
    tokens = jnp.asarray(stage.pipeline.tokenize(["a large red circle"] * 2))
    batch = {"image": jnp.zeros((2, 16, 16, 3)), "tokens": tokens}
    step_flops[train] = jaxpr_flops(jax.jit(stage.train_step).trace(state, batch).jaxpr.jaxpr)
  text_params = text_encoder_params(state.text_encoder)
  text_forward = model_flops(stage.pipeline.encode_text, text_params, batch["tokens"])
  assert text_forward > 0
  assert step_flops[True] - step_flops[False] == 2 * text_forward


def test_self_conditioned_samplers_hand_each_step_the_previous_estimate():
  # An x0-predicting "model" that returns the estimate it is given plus one: after N steps each
  # sampler's last x̂_0, which it returns as the image, is N exactly when the estimate is carried.
  schedule = schedules.scaled_linear()
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  count = lambda x, t, x0_estimate: x0_estimate + 1.0
  kw = {"prediction": "x0", "self_condition": True}
  for sample in (samplers.ddim_sample, samplers.dpm_solver_pp_2m_sample, samplers.ufogen_sample):
    np.testing.assert_allclose(sample(count, schedule, x_T, 4, **kw), 4.0, atol=1e-5)
  guided = samplers.classifier_free_guidance(
    lambda x, t, c, x0_estimate: x0_estimate + c[:, :1, :1, :1], jnp.ones((2, 1, 1, 1)),
    jnp.zeros((2, 1, 1, 1)), 3.0,
  )  # fmt: skip
  np.testing.assert_allclose(samplers.ddim_sample(guided, schedule, x_T, 4, **kw), 12.0, atol=1e-4)


def test_self_conditioned_training_steps_and_generate_hands_the_unet_its_estimates():
  from md_jax import config_utils

  model = config_utils.load_config(REPO / "configs/models/tiny.py")
  model.self_condition = True
  stage, state = _tiny_stage(model=model, optimizer={"warmup_steps": 0})
  pipeline = stage.pipeline
  assert state.unet.params["conv_in"]["kernel"].shape[-2] == 2 * stage.unet.in_channels
  tokens = jnp.asarray(pipeline.tokenize(["a large red circle"] * 2))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  _, metrics = jax.jit(stage.train_step)(state, {"image": images, "tokens": tokens})
  assert np.isfinite(float(metrics["loss"]))
  unet = jax.tree.map(lambda p: p + 0.05, state.unet.params)
  params = state.inference_params().replace(unet=unet)
  key = jax.random.key(0)
  for sampler in ("ddim", "dpm++", "ufogen"):
    out = pipeline.generate(
      params, tokens, seed=key, resolution=16, steps=4, cfg=1.0, sampler=sampler
    )
    assert out.shape == (2, 16, 16, 3)
  # generate's DDIM against the same sampler with the estimate withheld (zeros at every step).
  text = pipeline.encode_text(params.text_encoder, tokens)
  model_fn = lambda x, t, *e: stage.unet.apply(
    {"params": unet}, x, t, text, x0_estimate=e[0] if e else None
  )
  x_T = jax.random.normal(key, (2, *pipeline.latent_shape(16)))
  kw = {"prediction": stage.prediction, "rng": jax.random.fold_in(key, 1)}
  withheld = samplers.ddim_sample(model_fn, stage.schedule, x_T, 4, **kw)
  carried = samplers.ddim_sample(model_fn, stage.schedule, x_T, 4, self_condition=True, **kw)
  generated = pipeline.generate(params, tokens, seed=key, resolution=16, steps=4, cfg=1.0)
  decode = lambda z: np.asarray(
    jnp.clip(jnp.round((pipeline.latent_space.decode(params.autoencoder, z) + 1) * 127.5), 0, 255)
  )
  np.testing.assert_allclose(decode(carried), np.asarray(generated), atol=1)
  assert np.abs(decode(withheld) - np.asarray(generated)).max() > 1

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
  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.data.shapes_scene import LABEL_NAMES, caption_label_ids
  from md_jax.training import diffusion_params
  from md_jax.training.latent_classifier import load_guide
  from tests.test_diffusion import _tiny_stage

  stage, state = _tiny_stage()  # projection latents, f=4, c=8, SD's schedule: the tiny guide's
  run = str(latent_classifier_run)
  assert load_guide(None, stage, scale=0.0) is None
  with pytest.raises(ValueError, match="needs both"):
    load_guide(None, stage, scale=3.0)
  with pytest.raises(ValueError, match="needs both"):
    load_guide(run, stage, scale=0.0)
  with pytest.raises(ValueError, match=r"classifier keys \['shape'\] are not label keys"):
    load_guide(run, stage, scale=3.0, keys=("shape",))
  with pytest.raises(ValueError, match="is a 'diffusion' run, not latent_classifier"):
    load_guide(str(diffusion_run), stage, scale=3.0)
  cosine_stage, _ = _tiny_stage(schedule={"kind": "cosine", "num_steps": 1000})
  with pytest.raises(ValueError, match="another noise schedule"):
    load_guide(run, cosine_stage, scale=3.0)
  scaled_stage, _ = _tiny_stage(latents={**stage.config.latents.to_dict(), "scale": 2.0})
  with pytest.raises(ValueError, match="not the same latent space"):
    load_guide(run, scaled_stage, scale=3.0)

  prompts = [
    "a large red circle in the center on a white background",
    "a small blue star right of a large green square on a black background",
  ]
  guide = load_guide(run, stage, scale=30.0).with_labels(caption_label_ids(prompts))
  assert guide.keys == tuple(LABEL_NAMES) and guide.max_timestep == 799  # every one by default
  np.testing.assert_array_equal(guide.labels["kind_0"], [0, 1])  # canonical: the square first
  unet = jax.tree.map(lambda p: p + 0.05, state.unet.params)
  text = diffusion_params.text_encoder_params(state.text_encoder)
  tokens = jnp.asarray(tokenizer_lib.tokenize(stage.tokenizer, prompts))
  make = lambda resolution=32, **kw: np.asarray(stage.generate(
    unet, text, state.autoencoder, tokens, jax.random.key(0), resolution=resolution, steps=4, **kw
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
  assert images.shape == (2, 32, 32, 3) and settings["classifier_keys"] == list(LABEL_NAMES)
  with pytest.raises(ValueError, match="not a shapes caption: 'a red thing'"):
    guided(["a red thing"])


def _label_batch(stage, prompts, resolution):
  """A batch of `prompts` with their attribute labels, as the `shapes` pipeline yields them."""
  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.data.shapes_scene import LABEL_NAMES, parse_caption

  named = [parse_caption(p) for p in prompts]
  labels = {
    key: np.asarray([names.index(n[key]) for n in named], np.int32)
    for key, names in LABEL_NAMES.items()
  }
  images = jax.random.uniform(jax.random.key(1), (len(prompts), resolution, resolution, 3))
  tokens = tokenizer_lib.tokenize(stage.tokenizer, prompts)
  return {"image": images * 2 - 1, "tokens": jnp.asarray(tokens), **labels}


PROMPTS = (
  "a large red circle in the center on a white background",
  "a small blue star right of a large green square on a black background",
  "a small yellow triangle at the top on a gray background",
  "a large purple square on the left on a beige background",
)


def test_diffusion_classifier_loss_scores_the_unets_x0_on_captioned_examples_only(
  latent_classifier_run,
):
  prediction = "v"  # the job's; x̂_0 is read through the schedule, tested for every target
  from md_jax.data.shapes_scene import LABEL_NAMES
  from md_jax.training import diffusion, latent_classifier
  from tests.test_diffusion import _tiny_stage

  loss = {"checkpoint": str(latent_classifier_run), "weight": 0.5}
  with pytest.raises(ValueError, match=r"config.data.label_keys lacks \['background'"):
    _tiny_stage(prediction=prediction, classifier_loss=loss)
  plain_stage, _ = _tiny_stage(prediction=prediction)
  data = {**plain_stage.config.data.to_dict(), "label_keys": tuple(LABEL_NAMES)}
  stage, state = _tiny_stage(prediction=prediction, classifier_loss=loss, data=data)
  state = stage.load_pretrained(state)
  jax.tree.map(np.testing.assert_array_equal, state.classifier, stage.classifier.params)
  # The UNet's zero-initialised output would make x̂_0 the same for every weight: perturb it.
  unet = jax.tree.map(lambda p: p + 0.05, state.unet.params)
  state = state.replace(unet=state.unet.replace(params=unet))

  batch = _label_batch(stage, PROMPTS, resolution=32)  # 8×8 latents: what the classifier reads
  step = lambda s, st=state: jax.jit(s.train_step)(st, batch)
  _, plain_metrics = step(plain_stage)
  _, metrics = step(stage)
  # The same draw of t, noise and dropped captions: the loss differs by weight × cross-entropy.
  np.testing.assert_allclose(
    metrics["loss"], plain_metrics["loss"] + 0.5 * metrics["classifier"], rtol=1e-5
  )
  # Its gradient reaches the UNet through x̂_0 (the first step's lr is 0 in warmup: compare grads).
  assert abs(float(metrics["grad_norm"]) - float(plain_metrics["grad_norm"])) > 1e-4

  # The cross-entropy is the mean over the captioned examples alone: each example's own term
  # (the same key, so the same fresh noise) averaged over a mixed mask.
  guide = latent_classifier.batch_guide(stage.classifier, state.classifier, batch)
  x0_hat = jax.random.normal(jax.random.key(5), (len(PROMPTS), *guide.latent_shape))
  t = jnp.asarray([100, 400, 700, 950])
  score = lambda mask: latent_classifier.denoised_cross_entropy(
    guide, stage.schedule, x0_hat, t, jnp.asarray(mask), jax.random.key(6)
  )
  # `keys` scores a subset of the attributes: on the same draw, part of every attribute's sum.
  kinds = ("kind_0", "kind_1")
  kinds_config = stage.config.copy_and_resolve_references()
  kinds_config.classifier_loss.keys = kinds
  kinds_stage = diffusion.DiffusionStage(kinds_config)
  assert kinds_stage.classifier.keys == kinds
  kinds_guide = latent_classifier.batch_guide(kinds_stage.classifier, state.classifier, batch)
  kinds_score = latent_classifier.denoised_cross_entropy(
    kinds_guide, stage.schedule, x0_hat, t, jnp.ones(4, bool), jax.random.key(6)
  )
  assert 0 < float(kinds_score) < float(score([True] * 4))

  # `key_weights` weight each key's term: (2, 0) on the kinds is twice kind 0's alone.
  def weighted(keys, weights):
    return kinds_guide.replace(keys=keys, weights=weights).log_prob(x0_hat, t)

  np.testing.assert_allclose(weighted(kinds, (2, 0)), 2 * weighted(("kind_0",), (1,)), rtol=1e-5)
  # `max_timestep` scores only the examples noised to t ≤ it: those above count for nothing.
  cut_config = stage.config.copy_and_resolve_references()
  cut_config.classifier_loss.max_timestep = 500
  cut_stage = diffusion.DiffusionStage(cut_config)
  x_t, pred = x0_hat, jax.random.normal(jax.random.key(7), x0_hat.shape)

  def stage_loss(a_stage, drop):
    a_loss = a_stage.classifier_loss(
      state.classifier, batch, pred, x_t, t, jnp.asarray(drop), jax.random.key(6)
    )
    return float(a_loss)

  # A read floor of the classifier's last t reads every example there, whatever its own t.
  last_t = guide.max_timestep
  read = lambda t_, floor: latent_classifier.denoised_cross_entropy(
    guide, stage.schedule, x0_hat, t_, jnp.ones(4, bool), jax.random.key(6), floor
  )
  np.testing.assert_allclose(read(t, last_t), read(jnp.full(4, last_t), 0), rtol=1e-5)
  assert not np.isclose(read(t, last_t), read(t, 0), rtol=1e-3)
  first_two = [stage_loss(stage, np.arange(4) != i) for i in range(2)]  # t = 100, 400 alone
  cut = stage_loss(cut_stage, [False] * 4)
  np.testing.assert_allclose(cut, sum(first_two) / 2, rtol=1e-5)
  assert not np.isclose(cut, stage_loss(stage, [False] * 4), rtol=1e-3)
  each = [float(score(np.arange(4) == i)) for i in range(4)]
  assert len(set(each)) == 4  # the examples differ, so the mask's choice shows
  np.testing.assert_allclose(score([True, False, True, False]), (each[0] + each[2]) / 2, rtol=1e-5)
  # Every caption dropped (the unconditional branch): nothing for the classifier to ask.
  assert float(score([False] * 4)) == 0.0
  stage.config.condition_dropout = 1.0
  _, metrics = step(stage)
  assert float(metrics["classifier"]) == 0.0
  # At 16 px (the 4×4 latents of a first phase) the classifier reads nothing: the plain loss.
  _, metrics = jax.jit(stage.train_step)(state, _label_batch(stage, PROMPTS, resolution=16))
  assert "classifier" not in metrics


def test_diffusion_classifier_loss_rejects_bad_settings(latent_classifier_run):
  from md_jax.data.shapes_scene import LABEL_NAMES
  from tests.test_diffusion import _tiny_stage

  for settings, message in [
    ({"checkpoint": "", "weight": 2.0}, r"weight=2.0 needs config.classifier_loss.checkpoint"),
    ({"checkpoint": str(latent_classifier_run), "weight": -1.0}, r"weight=-1.0: expected ≥ 0"),
  ]:
    with pytest.raises(ValueError, match=message):
      _tiny_stage(classifier_loss=settings)
  stage, _ = _tiny_stage()
  assert stage.classifier is None
  labelled = {**stage.config.data.to_dict(), "label_keys": tuple(LABEL_NAMES)}
  settings = {"checkpoint": str(latent_classifier_run), "weight": 2.0}
  progressive = {**stage.config.progressive.to_dict(), "resolutions": (64, 128)}
  with pytest.raises(ValueError, match=r"reads \(8, 8, 8\) latents, and no phase .* \[64, 128\]"):
    _tiny_stage(classifier_loss=settings, data=labelled, progressive=progressive)
  with pytest.raises(ValueError, match=r"classifier keys \['kind'\] are not label keys"):
    _tiny_stage(classifier_loss={**settings, "keys": ("kind",)}, data=labelled)
  with pytest.raises(ValueError, match=r"config.classifier_loss.max_timestep=-1: expected ≥ 0"):
    _tiny_stage(classifier_loss={**settings, "max_timestep": -1}, data=labelled)
  with pytest.raises(ValueError, match=r"min_read_timestep=1000: expected 0 … \d+, the t the"):
    _tiny_stage(classifier_loss={**settings, "min_read_timestep": 1000}, data=labelled)
  for key_weights in [(1.0,), (1.0, -0.5)]:  # one per key, none negative
    with pytest.raises(ValueError, match=r"key weights \[.*\]: expected one ≥ 0 for each of"):
      _tiny_stage(
        classifier_loss={**settings, "keys": ("kind_0", "kind_1"), "key_weights": key_weights},
        data=labelled,
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
  batch = _label_batch(stage.diffusion, PROMPTS * 2, resolution=32)
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

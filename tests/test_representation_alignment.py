"""Representation alignment (REPA): the cosine term, the UNet's head, the diffusion stage's loss."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_latent_classifier import PROMPTS, _label_batch

REPO = pathlib.Path(__file__).parents[1]


def test_cosine_alignment_loss_matches_a_reference_and_rejects_mismatched_maps():
  from md_jax.training.representation_alignment import cosine_alignment_loss

  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(2, 3, 3, 5)), rng.normal(size=(2, 3, 3, 5))
  cosine = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  loss = cosine_alignment_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(loss, 1 - cosine.mean(), rtol=1e-5)
  scaled = jnp.asarray(3 * b, jnp.float32)  # the direction counts, not the length
  np.testing.assert_allclose(cosine_alignment_loss(scaled, jnp.asarray(b)), 0.0, atol=1e-6)
  np.testing.assert_allclose(cosine_alignment_loss(-scaled, jnp.asarray(b)), 2.0, atol=1e-6)
  with pytest.raises(ValueError, match=r"representation \(2, 3, 3, 4\) and target"):
    cosine_alignment_loss(jnp.asarray(a[..., :4]), jnp.asarray(b))


def _headed_stage(representation_dim=16, **overrides):
  """The tiny diffusion stage (`_tiny_stage`) with a representation head of this width."""
  from md_jax import config_utils
  from tests.test_diffusion import _tiny_stage

  model = config_utils.load_config(REPO / "configs/diffusion.py:tiny").model.to_dict()
  return _tiny_stage(model={**model, "representation_dim": representation_dim}, **overrides)


def test_representation_alignment_pulls_the_unets_middle_and_leaves_its_output_path_alone(
  latent_classifier_run,
):
  from md_jax.training import representation_alignment
  from md_jax.training.diffusion import text_encoder_params

  align = {"checkpoint": str(latent_classifier_run), "weight": 0.5}
  plain_stage, _ = _headed_stage()  # the same UNet, the loss off
  assert plain_stage.representation_encoder is None
  stage, state = _headed_stage(representation_alignment=align)  # the data has no labels: none read
  state = stage.load_pretrained(state)
  encoder = stage.representation_encoder
  jax.tree.map(np.testing.assert_array_equal, state.representation_encoder, encoder.params)
  unet = jax.tree.map(lambda p: p + 0.05, state.unet.params)  # off the zero-initialised output
  state = state.replace(unet=state.unet.replace(params=unet))
  text_params = text_encoder_params(state.text_encoder, ema=False)

  # 8×8 latents: what the classifier reads.
  batch = _label_batch(stage.pipeline, PROMPTS, resolution=32)
  loss_and_grads = lambda s: jax.jit(jax.value_and_grad(s.loss, has_aux=True))(
    (unet, text_params), state, batch
  )
  (plain_loss, _), (plain_grads, _) = loss_and_grads(plain_stage)
  (loss, terms), (grads, _) = loss_and_grads(stage)
  np.testing.assert_allclose(loss, plain_loss + 0.5 * terms["representation"], rtol=1e-5)
  _, metrics = jax.jit(stage.train_step)(state, batch)  # the step reports the same term
  np.testing.assert_allclose(metrics["representation"], terms["representation"], rtol=1e-6)

  # The term itself: the UNet's representation of the step's x_t against the encoder's map of
  # its x_0, rebuilt outside the stage from the same draws.
  k_t, k_noise, k_drop = jax.random.split(state.unet.step_rng(), 3)
  x0 = stage.pipeline.latent_space.encode(state.autoencoder, batch["image"])
  t = jax.random.randint(k_t, (len(PROMPTS),), 0, stage.schedule.num_steps)
  x_t = stage.schedule.add_noise(x0, jax.random.normal(k_noise, x0.shape), t)
  drop = jax.random.bernoulli(k_drop, stage.config.condition_dropout, (len(PROMPTS),))
  text = stage.pipeline.encode_text(text_params, batch["tokens"])
  _, sown = stage.unet.apply(
    {"params": unet}, x_t, t, text, drop_text=drop, mutable=["intermediates"]
  )
  (representation,) = sown["intermediates"]["innermost"]["representation"]
  features = representation_alignment.encoder_features(
    encoder.model, state.representation_encoder, x0
  )
  assert representation.shape == features.shape == (4, 4, 4, 16)
  rep, tgt = np.asarray(representation, np.float64), np.asarray(features, np.float64)
  cosine = np.sum(rep * tgt, -1) / (np.linalg.norm(rep, axis=-1) * np.linalg.norm(tgt, axis=-1))
  np.testing.assert_allclose(terms["representation"], 1 - cosine.mean(), rtol=1e-4)

  # Its gradient reaches the head and the middle, never the path from the middle to the output.
  for name in ("conv_out", "norm_out", "up_0"):
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-9),
      grads[name], plain_grads[name],
    )  # fmt: skip
  head = lambda g: np.abs(np.asarray(g["innermost"]["representation_out"]["kernel"])).max()
  assert head(plain_grads) == 0.0 and head(grads) > 0.0
  middle = lambda g: jax.tree.leaves(g["innermost"]["mid_block_0"])
  assert any(not np.allclose(a, p, rtol=1e-3) for a, p in zip(middle(grads), middle(plain_grads)))
  # At 16 px (4×4 latents) the classifier reads nothing: the plain loss; with `every_phase` its
  # convolutional map reads them too.
  small = _label_batch(stage.pipeline, PROMPTS, resolution=16)
  _, metrics = jax.jit(stage.train_step)(state, small)
  assert "representation" not in metrics
  every_phase, _ = _headed_stage(representation_alignment={**align, "every_phase": True})
  _, metrics = jax.jit(every_phase.train_step)(state, small)
  assert 0 < float(metrics["representation"]) < 2


def test_the_representation_head_leaves_the_prediction_unchanged_and_bad_settings_fail(
  latent_classifier_run,
):
  from md_jax.models.unet import UNet

  stage, state = _headed_stage()
  plain = UNet.from_config(stage.config.model, representation_dim=0)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  text = jax.random.normal(jax.random.key(1), (2, 77, stage.config.model.text_dim))
  params = jax.tree.map(lambda p: p + 0.05, state.unet.params)
  without_head = {k: v for k, v in params["innermost"].items() if "representation" not in k}
  assert set(params["innermost"]) - set(without_head) == {
    "representation_hidden", "representation_out"
  }  # fmt: skip
  t = jnp.array([10, 900])
  np.testing.assert_array_equal(
    stage.unet.apply({"params": params}, x, t, text),
    plain.apply({"params": {**params, "innermost": without_head}}, x, t, text),
  )

  align = {"checkpoint": str(latent_classifier_run), "weight": 0.5}
  with pytest.raises(ValueError, match=r"is \(4, 4, 8\) \(config.model.representation_dim=8\) .*"
                     r"is \(4, 4, 16\): set representation_dim to 16"):  # fmt: skip
    _headed_stage(8, representation_alignment=align)
  with pytest.raises(ValueError, match=r"weight=0.5 needs config.representation_alignment.check"):
    _headed_stage(representation_alignment={**align, "checkpoint": ""})
  with pytest.raises(ValueError, match=r"representation_alignment.weight=-1.0: expected ≥ 0"):
    _headed_stage(representation_alignment={**align, "weight": -1.0})

"""UFOGen: G and D start from the diffusion UNet, the adversarial term reaches G, LoRA, resume."""

import pathlib

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from md_jax import config_utils, generate
from md_jax.infra import checkpoints
from md_jax.models import lora
from md_jax.training import trainer, ufogen
from tests.test_trainer import _config

REPO = pathlib.Path(__file__).parents[1]


def _ufogen_config(data_dir, diffusion_run, **ufogen_overrides):
  config = config_utils.load_config(REPO / "configs/ufogen.py:tiny")
  source = _config(data_dir)  # the diffusion run's model, text encoder and latent space
  config.model, config.text_encoder, config.latents = (
    source.model,
    source.text_encoder,
    source.latents,
  )
  config.data = source.data
  config.data.resolution, config.global_batch_size = 32, 8
  config.num_train_steps = 2
  config.checkpoint_every, config.log_every, config.sample_every = 1, 1, 0
  config.report_every_secs = 1000
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.init_checkpoint = str(diffusion_run)
  for key, value in ufogen_overrides.items():
    config.ufogen[key] = value
  return config


def _initial_state(stage, diffusion_run):
  rng = jax.random.key_data(jax.random.key(0))
  state = jax.jit(lambda r: nn.meta.unbox(stage.init_state(r)))(rng)
  tree, _ = checkpoints.load_state_tree(str(diffusion_run))
  return stage.initialize_from(state, tree), tree


def _batch(stage, size=8, resolution=32):
  from md_jax.data import tokenizer as tokenizer_lib

  tokens = tokenizer_lib.tokenize(
    stage.pipeline.tokenizer, ["a large red circle in the center"] * size
  )
  images = jax.random.uniform(jax.random.key(1), (size, resolution, resolution, 3), minval=-1)
  return {"image": images, "tokens": tokens}


def _changed(a, b):
  return [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def test_generator_and_discriminator_start_from_the_unet_and_only_d_sees_the_adversary(
  shapes_data_dir, diffusion_run
):
  config = _ufogen_config(shapes_data_dir, diffusion_run, reconstruction_weight=0.0)
  stage = ufogen.UFOGenStage(config)
  state, tree = _initial_state(stage, diffusion_run)
  source_unet = tree["unet"]["ema_params"]
  assert not any(_changed(state.unet.params, source_unet))
  body = state.discriminator.params["unet"]
  assert not any(_changed(body, checkpoints.copy_into(source_unet, body)))
  assert "up_0" not in body and "conv_out" not in body  # encoder + middle only
  batch = _batch(stage)
  text = stage.pipeline.encode_text(state.text_encoder, batch["tokens"])
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 8))
  logits = stage.discriminator.apply(
    {"params": state.discriminator.params}, x, np.full((8,), 500), text
  )
  np.testing.assert_array_equal(logits, 0.0)  # zero-init output layer

  # With the reconstruction term off, G moves only through D's input. D's head is zero at init,
  # so it passes G no gradient until it has learned something: give it a random head.
  head = state.discriminator.params["head_logits"]
  random_head = {**head, "kernel": jax.random.normal(jax.random.key(3), head["kernel"].shape)}
  d_params = {**state.discriminator.params, "head_logits": random_head}
  state = state.replace(discriminator=state.discriminator.replace(params=d_params))
  step = jax.jit(stage.train_step)
  moved, metrics = step(state, batch)
  assert float(metrics["generator_adversarial"]) > 0
  assert all(_changed(state.unet.params["conv_out"], moved.unet.params["conv_out"]))

  config.ufogen.adversarial_weight = 0.0  # nothing left to move G: it stays put
  still, _ = jax.jit(ufogen.UFOGenStage(config).train_step)(state, batch)
  assert not any(_changed(state.unet.params, still.unet.params))
  assert any(_changed(state.discriminator.params, still.discriminator.params))


def test_lora_variant_trains_factors_over_a_frozen_base_and_generates(
  shapes_data_dir, diffusion_run, tmp_path
):
  config = _ufogen_config(shapes_data_dir, diffusion_run)
  config.ufogen.lora.rank = 2
  stage = ufogen.UFOGenStage(config)
  final = trainer.train_and_evaluate(config, str(tmp_path), stage)
  assert int(final.step) == 2
  tree, _ = checkpoints.load_state_tree(str(diffusion_run))
  source = tree["unet"]["ema_params"]
  base = jax.device_get(final.frozen["unet"])
  assert not any(_changed(base, source))  # the base never trains
  factors = jax.tree_util.tree_leaves_with_path(jax.device_get(final.unet.params))
  assert factors and all(
    jax.tree_util.keystr(p).endswith(("'lora_a']", "'lora_b']")) for p, _ in factors
  )
  merged = lora.merge(base, jax.device_get(final.unet.params), config.ufogen.lora.alpha, 2)
  assert any(_changed(merged, source))  # B moved off zero

  images, settings = generate.generate(
    str(tmp_path), ["a small blue square on the left on a black background"], sampler="ufogen",
    steps=1, seed=0, resolution=32,
  )  # fmt: skip
  assert images.shape == (1, 32, 32, 3) and settings["step"] == 2


def test_lora_merge_starts_at_the_base_and_bad_settings_are_named():
  params = {"dense": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  factors = lora.init_lora(params, 2, jax.random.key(0))
  assert set(factors["dense"]["kernel"]) == {"lora_a", "lora_b"} and "bias" not in factors["dense"]
  np.testing.assert_array_equal(lora.merge(params, factors, 4.0, 2)["dense"]["kernel"], 1.0)
  factors["dense"]["kernel"]["lora_b"] = np.ones((2, 3), np.float32)
  a = np.asarray(factors["dense"]["kernel"]["lora_a"])
  np.testing.assert_allclose(
    lora.merge(params, factors, 4.0, 2)["dense"]["kernel"],
    1.0 + 2.0 * a @ np.ones((2, 3)),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="rank must be positive"):
    lora.init_lora(params, 0, jax.random.key(0))

  config = config_utils.load_config(REPO / "configs/ufogen.py:tiny")
  config.ufogen.objective = "distil"
  with pytest.raises(ValueError, match=r"config.ufogen.objective='distil'"):
    ufogen.UFOGenStage(config)


def test_discriminator_body_moves_at_its_scaled_lr_and_the_head_at_the_full_lr():
  opt = {"name": "adam", "lr": 1e-3, "b1": 0.0, "b2": 0.99, "warmup_steps": 0, "grad_clip": 0.0}
  params = {"unet": {"kernel": np.ones(3, np.float32)}, "head_logits": {"kernel": np.ones(2)}}
  grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)

  def update(body_lr_scale):
    d_config = ml_collections.ConfigDict({"optimizer": opt, "body_lr_scale": body_lr_scale})
    tx = ufogen.discriminator_optimizer(d_config)
    return tx.update(grads, tx.init(params), params)[0]

  full, scaled = update(1.0), update(0.1)
  np.testing.assert_allclose(scaled["unet"]["kernel"], 0.1 * full["unet"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(scaled["head_logits"]["kernel"], full["head_logits"]["kernel"])
  assert np.all(np.asarray(full["unet"]["kernel"]) < 0)  # a real step, not a zero update


def test_probe_pair_accuracy_counts_wins_per_noise_bucket_and_ties_as_half():
  from md_jax.benchmarks.discriminator_probe import pair_accuracy

  real = np.array([1.0, 0.0, 2.0, 0.5, 0.0])
  fake = np.array([0.0, 1.0, 2.0, 0.0, 0.0])
  t_prev = np.array([10, 200, 260, 999, 998])
  assert pair_accuracy(real, fake, t_prev, num_steps=1000) == {
    "t'_0-249": 0.5, "t'_250-499": 0.5, "t'_750-999": 0.75,
  }  # fmt: skip

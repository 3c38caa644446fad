"""`md_jax.benchmarks.train_step --sizes=main` builds the main job's diffusion step: from a job's
runs, or (without `--job`) the UNet step alone."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl.testing import flagsaver

from md_jax.benchmarks import train_step
from md_jax.data import tokenizer
from md_jax.training import diffusion


def test_main_without_a_job_is_the_unet_step_alone(parsed_flags):
  config, batch, resolution = train_step.size_config("main")
  assert (batch, resolution) == (
    config.progressive.batch_sizes[-1],
    config.progressive.resolutions[-1],
  )
  assert config.latents.kind == "projection" and config.representation_alignment.weight == 0
  stage = diffusion.DiffusionStage(config)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  state = nn.meta.unbox(jax.eval_shape(stage.init_state, rng))  # reads no run
  tokens = tokenizer.tokenize(stage.pipeline.tokenizer, ["a small red circle"])
  batch_shapes = {
    "image": jax.ShapeDtypeStruct((batch, resolution, resolution, 3), jnp.float32),
    "tokens": jax.ShapeDtypeStruct((batch, tokens.shape[1]), tokens.dtype),
  }
  _, metrics = jax.eval_shape(stage.train_step, state, batch_shapes)
  assert metrics["loss"].shape == ()


def test_main_with_a_job_reads_its_runs_and_names_a_missing_one(parsed_flags, tmp_path):
  job = tmp_path / "job"
  with flagsaver.flagsaver(job=str(job)):
    config, _, _ = train_step.size_config("main")
  assert config.latents.checkpoint == str(job / "decoder_distill")
  assert config.representation_alignment.checkpoint == str(job / "latent_classifier")
  assert config.representation_alignment.weight > 0  # the job's step, its alignment term included
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  with pytest.raises(FileNotFoundError, match=str(job)):
    jax.eval_shape(diffusion.DiffusionStage(config).init_state, rng)

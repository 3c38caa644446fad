"""Configs: load, variants, overrides, the resolved config in the workdir, and clear errors."""

import json
import pathlib
import subprocess
import sys

import pytest

from md_jax import config_utils

REPO = pathlib.Path(__file__).parents[1]


def _main(*args, cwd=REPO):
  return subprocess.run(
    [sys.executable, "-m", "md_jax.main", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_load_config_and_variant():
  default = config_utils.load_config(REPO / "configs/data.py")
  tiny = config_utils.load_config(f"{REPO}/configs/data.py:tiny")
  assert default.stage == tiny.stage == "data"
  assert tiny.data.resolution < default.data.resolution
  assert tiny.global_batch_size < default.global_batch_size


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    config_utils.load_config(f"{REPO}/configs/data.py:huge")


def test_relative_load_and_missing_file():
  cfg = config_utils.load_config("data.py:tiny", relative_to=str(REPO / "configs/any.py"))
  assert cfg.data.resolution == 32
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_utils.load_config(REPO / "configs/nope.py")


def test_main_writes_resolved_config_with_overrides(tmp_path, shapes_data_dir):
  workdir = tmp_path / "wd"
  result = _main(
    "--config=configs/data.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={shapes_data_dir}",
    "--config.num_batches=3",
    "--config.data.random_crop=True",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads((workdir / "config.json").read_text())
  assert written["num_batches"] == 3
  assert written["data"]["random_crop"] is True
  assert written["data"]["data_dir"] == shapes_data_dir
  assert (workdir / "data_preview.png").exists()
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
  last_line = result.stdout.strip().splitlines()[-1]
  assert json.loads(last_line)["images_per_s"] > 0


@pytest.mark.parametrize(
  "override, expected",
  [
    ("--config.data.bogus=3", "unknown config key 'bogus' in --config.data.bogus=3"),
    ("--config.global_batch_size=abc", "--config.global_batch_size=abc"),
  ],
)
def test_bad_override_fails_in_one_line_naming_the_key(tmp_path, override, expected):
  result = _main("--config=configs/data.py:tiny", f"--workdir={tmp_path}", override)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if "FATAL" in line]
  assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "config.json").exists()


def test_unknown_stage_is_named(tmp_path):
  result = _main("--config=configs/data.py:tiny", f"--workdir={tmp_path}", "--config.stage=dat")
  assert result.returncode != 0
  assert "config.stage='dat' is not a known stage" in result.stderr


def test_the_vae_config_needs_lpips_weights_and_its_smoke_variant_traces_at_full_size(tmp_path):
  """configs/vae.py is the paper's autoencoder at full size: without LPIPS weights it stops with
  an error naming the key; `:smoke` builds and traces the full-size step (VGG16 LPIPS and PatchGAN
  included) with nothing allocated, from a random LPIPS file of the converter's layout."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from safetensors.numpy import save_file

  from md_jax.models import lpips
  from md_jax.training import preflight, vae

  with pytest.raises(ValueError, match="config.perceptual.weights"):
    vae.VAEStage(config_utils.load_config(REPO / "configs/vae.py"))

  module = lpips.LPIPS()
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), image, image)["params"])
  flat = {
    ".".join(k.key for k in path): np.zeros(leaf.shape, np.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]
  }
  save_file(flat, str(tmp_path / "lpips.safetensors"))

  smoke = config_utils.load_config(REPO / "configs/vae.py:smoke")
  smoke.perceptual.weights = str(tmp_path / "lpips.safetensors")
  preflight.check_intervals(smoke)
  preflight.check_batch_sizes(smoke)
  stage = vae.VAEStage(smoke)
  # Unboxed from their logical axes, as the trainer hands the state to its step.
  state = nn.meta.unbox(jax.eval_shape(stage.init_state, jax.ShapeDtypeStruct((2,), jnp.uint32)))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(state.perceptual) > 14e6  # VGG16's convolutions at full width
  batch = {"image": jax.ShapeDtypeStruct((8, 256, 256, 3), jnp.float32)}
  new_state, metrics = jax.eval_shape(stage.train_step, state, batch)
  assert metrics["loss"].shape == ()
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_the_paper_config_needs_a_vae_run_and_its_smoke_variant_traces_at_full_size():
  """configs/mobilediffusion.py trains on a VAE run's latents (a missing one is named before
  anything compiles); `:smoke` builds and traces the full-size step with nothing allocated."""
  import jax
  import jax.numpy as jnp

  from md_jax.data import tokenizer
  from md_jax.training import diffusion, preflight

  paper = config_utils.load_config(REPO / "configs/mobilediffusion.py")
  with pytest.raises(
    ValueError, match=r"config.latents.kind='vae' needs config.latents.checkpoint"
  ):
    diffusion.DiffusionStage(paper)

  smoke = config_utils.load_config(REPO / "configs/mobilediffusion.py:smoke")
  preflight.check_intervals(smoke)
  preflight.check_batch_sizes(smoke)
  preflight.check_resolutions(smoke)
  stage = diffusion.DiffusionStage(smoke)
  state = jax.eval_shape(stage.init_state, jax.ShapeDtypeStruct((2,), jnp.uint32))

  def count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))

  assert 380e6 < count(state.unet.params) < 395e6  # Table 1: 386M
  assert count(state.autoencoder["encoder"]) > 30e6  # the paper's VAE encoder is in the step
  batch = {
    "image": jax.ShapeDtypeStruct((8, 256, 256, 3), jnp.float32),
    "tokens": jax.ShapeDtypeStruct((8, tokenizer.CONTEXT_LENGTH), jnp.int32),
  }
  new_state, metrics = jax.eval_shape(stage.train_step, state, batch)
  assert metrics["loss"].shape == ()
  assert jax.tree.structure(new_state) == jax.tree.structure(state)

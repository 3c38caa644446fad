"""The autoencoder, its losses, and the `vae` / `decoder_distill` stages on `shapes`."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from md_jax import config_utils
from md_jax.infra import checkpoints
from md_jax.models import lpips as lpips_lib
from md_jax.models import vae
from md_jax.models.discriminator import PatchDiscriminator
from md_jax.pipeline import latent_space
from md_jax.tools import convert_lpips
from md_jax.training import adversarial, trainer
from md_jax.training.diffusion import DiffusionStage
from md_jax.training.vae import VAEStage, noised_latents, pool_and_turn

REPO = pathlib.Path(__file__).parents[1]


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _scalars(workdir, tag):
  """[(step, value)] of one clu scalar from the workdir's TensorBoard events."""
  import tensorflow as tf

  values = []
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          values.append((event.step, float(tf.make_ndarray(v.tensor))))
  return values


# --- the model -------------------------------------------------------------------------------


def test_f8_c8_shapes_of_the_paper_config_and_the_tiny_one():
  full = vae.autoencoder_from_config(config_utils.load_config(REPO / "configs/models/vae.py"))
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(full.init, jax.random.key(0), images)
  (recon, posterior) = jax.eval_shape(full.apply, variables, images)
  assert posterior.mean.shape == (2, 32, 32, 8)  # 256 / 8, c = 8
  assert recon.shape == (2, 256, 256, 3)

  tiny = vae.autoencoder_from_config(
    config_utils.load_config(REPO / "configs/models/vae.py:tiny"), light=True
  )
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1, maxval=1)
  params = tiny.init(jax.random.key(0), x)
  recon, posterior = tiny.apply(params, x, jax.random.key(2))
  assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 8, 8)
  assert recon.shape == x.shape and np.all(np.isfinite(recon))


def test_kl_is_nonnegative_and_zero_exactly_for_the_prior():
  key_m, key_v = jax.random.split(jax.random.key(0))
  mean = jax.random.normal(key_m, (4, 2, 2, 8))
  logvar = jax.random.normal(key_v, (4, 2, 2, 8))
  kl = vae.DiagonalGaussian(mean, logvar).kl()
  assert kl.shape == (4,) and np.all(kl > 0)
  prior = vae.DiagonalGaussian(jnp.zeros((3, 2, 2, 8)), jnp.zeros((3, 2, 2, 8)))
  np.testing.assert_array_equal(prior.kl(), np.zeros(3))
  # Against the closed form for one element: KL(N(m, s²) || N(0, 1)) = (m² + s² − 1 − ln s²) / 2.
  one = vae.DiagonalGaussian(jnp.full((1, 1), 0.5), jnp.full((1, 1), np.log(2.0)))
  np.testing.assert_allclose(one.kl(), [(0.25 + 2 - 1 - np.log(2.0)) / 2], rtol=1e-6)


def test_patch_discriminator_gives_one_logit_per_patch():
  d = PatchDiscriminator(channels=8, num_layers=3, num_groups=4)
  x = jnp.zeros((2, 64, 64, 3))
  logits = d.apply(d.init(jax.random.key(0), x), x)
  assert logits.shape == (2, 6, 6, 1)  # 64 → 32 → 16 → 8 → 7 → 6 (taming's PatchGAN)


def test_gan_losses_and_adaptive_weight():
  sure = jnp.full((2, 3, 3, 1), 5.0)
  np.testing.assert_allclose(adversarial.discriminator_loss(sure, -sure, "hinge"), 0.0)
  np.testing.assert_allclose(adversarial.discriminator_loss(-sure, sure, "hinge"), 6.0)
  np.testing.assert_allclose(adversarial.generator_loss(sure, "hinge"), -5.0)
  ns = adversarial.discriminator_loss(sure, -sure, "non_saturating")
  np.testing.assert_allclose(ns, np.log1p(np.exp(-5.0)), rtol=1e-6)
  with pytest.raises(ValueError, match="wasserstein"):
    adversarial.generator_loss(sure, "wasserstein")
  w = adversarial.adaptive_weight(jnp.full((4,), 3.0), jnp.full((4,), 1.0))
  np.testing.assert_allclose(w, 6.0 / (2.0 + 1e-4), rtol=1e-6)  # norms 6 and 2


# --- LPIPS: conversion from the PyTorch layout, numerics against a torch reference -------------


def _torch_lpips_files(tmp_path, divisor=16):
  """Random VGG16 + LPIPS-lin state dicts in torchvision / lpips key layout, saved with torch."""
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  vgg, in_ch = {}, 3
  widths = [w // divisor for _, n, w in lpips_lib.VGG16_BLOCKS for _ in range(n)]
  for index, width in zip(convert_lpips._TORCH_CONV_INDICES, widths):
    vgg[f"features.{index}.weight"] = torch.randn(width, in_ch, 3, 3, generator=gen) * 0.3
    vgg[f"features.{index}.bias"] = torch.randn(width, generator=gen) * 0.1
    in_ch = width
  taps = [w // divisor for _, _, w in lpips_lib.VGG16_BLOCKS]
  lin = {
    f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(taps)
  }
  torch.save(vgg, tmp_path / "vgg16.pth")
  torch.save(lin, tmp_path / "lin.pth")
  return vgg, lin


def _torch_reference_lpips(vgg, lin, x, y):
  """LPIPS written directly in torch from the original state dicts (NCHW)."""
  import torch
  import torch.nn.functional as F

  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
  taps = {3: 0, 8: 1, 15: 2, 22: 3, 29: 4}  # relu1_2 ... relu5_3 in torchvision's indices
  feats = []
  for img in (x, y):
    h, out = (img - shift) / scale, []
    for index in range(30):
      if f"features.{index}.weight" in vgg:
        h = F.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"], padding=1)
      elif index in (4, 9, 16, 23):
        h = F.max_pool2d(h, 2)
      else:
        h = F.relu(h)
      if index in taps:
        out.append(h / (torch.sqrt(torch.sum(h * h, dim=1, keepdim=True)) + 1e-10))
    feats.append(out)
  total = 0
  for k, (a, b) in enumerate(zip(*feats)):
    total = total + (lin[f"lin{k}.model.1.weight"] * (a - b) ** 2).sum(dim=1).mean(dim=(1, 2))
  return total


def test_converted_lpips_matches_a_torch_reference(tmp_path):
  torch = pytest.importorskip("torch")
  vgg, lin = _torch_lpips_files(tmp_path)
  out = tmp_path / "lpips.safetensors"
  # What `python -m md_jax.tools.convert_lpips --vgg=... --lin=... --out=...` does.
  state_vgg = convert_lpips._load_torch(str(tmp_path / "vgg16.pth"))
  state_lin = convert_lpips._load_torch(str(tmp_path / "lin.pth"))
  save_file(convert_lpips.convert(state_vgg, state_lin), str(out))
  module, params = lpips_lib.load_lpips(str(out))
  assert module.width_divisor == 16

  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  ours = module.apply({"params": params}, x, y)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  theirs = _torch_reference_lpips(vgg, lin, nchw(x), nchw(y)).detach().numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(module.apply({"params": params}, x, x), 0.0, atol=1e-6)


def test_lpips_weights_are_checked_and_required(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_lpips"):
    lpips_lib.load_lpips(str(tmp_path / "absent.safetensors"))
  flat = _random_lpips_flat(divisor=16)
  del flat["lin3"]
  flat["conv2_1.kernel"] = flat["conv2_1.kernel"][..., :2]
  save_file(flat, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match=r"missing lin3.*conv2_1.kernel has shape"):
    lpips_lib.load_lpips(str(tmp_path / "bad.safetensors"))
  config = config_utils.load_config(REPO / "configs/vae.py")  # the paper config: LPIPS weight 1.0
  with pytest.raises(ValueError, match="config.perceptual.weights"):
    VAEStage(config)


def _random_lpips_flat(divisor: int) -> dict:
  module = lpips_lib.LPIPS(width_divisor=divisor)
  x = jnp.zeros((1, 32, 32, 3))
  params = nn.meta.unbox(module.init(jax.random.key(0), x, x)["params"])
  flat = {}
  for name, leaf in params.items():
    if isinstance(leaf, dict):
      flat.update({f"{name}.{k}": np.asarray(v) for k, v in leaf.items()})
    else:
      flat[name] = np.abs(np.asarray(leaf))  # LPIPS's linear weights are non-negative
  return flat


# --- the stages -------------------------------------------------------------------------------


def _vae_config(data_dir, lpips_file, **overrides):
  config = config_utils.load_config(REPO / "configs/vae.py:tiny")
  config.data.dataset = "shapes/r32_small"
  config.data.data_dir = data_dir
  config.data.resolution = 32
  config.data.num_threads = 2
  config.global_batch_size = 8
  config.model.num_groups = 4
  config.model.encoder.channels = 8
  config.model.encoder.channel_mult = (1, 2, 2, 2)
  config.model.decoder.channels = 8
  config.model.decoder.channel_mult = (1, 2, 2, 2)
  config.model.decoder.num_res_blocks = 1
  config.model.light_decoder.channels = 4
  config.model.light_decoder.channel_mult = (1, 2, 2, 2)
  config.gan.discriminator.channels = 8
  config.gan.discriminator.num_groups = 4
  config.gan.start_step = 10
  config.perceptual.weight = 0.1
  config.perceptual.weights = lpips_file
  config.num_train_steps = 16
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 5
  config.latent_std_batches = 2
  config.checkpoint_every = 8
  config.log_every = 4
  config.sample_every = 16
  config.report_every_secs = 1000
  config.mesh.data, config.mesh.fsdp = 4, 2
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("lpips") / "lpips_small.safetensors"
  save_file(_random_lpips_flat(divisor=16), str(path))
  return str(path)


@pytest.fixture(scope="module")
def trained_vae(shapes_data_dir, lpips_file, tmp_path_factory):
  """(workdir, final state) of 16 steps of the vae stage: adversarial from step 10, LPIPS on."""
  workdir = tmp_path_factory.mktemp("vae")
  config = _vae_config(shapes_data_dir, lpips_file)
  state = trainer.train_and_evaluate(config, str(workdir), VAEStage(config))
  return workdir, _host(state)


def test_vae_steps_lower_the_reconstruction_loss(trained_vae):
  workdir, state = trained_vae
  rec = _scalars(workdir, "reconstruction")
  assert [s for s, _ in rec] == [4, 8, 12, 16]
  assert rec[-1][1] < 0.5 * rec[0][1], rec
  assert all(v > 0 for _, v in _scalars(workdir, "perceptual"))
  weights = dict(_scalars(workdir, "adversarial_weight"))
  assert weights[8] == 0 and weights[16] > 0  # D joins at gan.start_step (means over 4 steps)
  assert (workdir / "samples" / "00000016.png").exists()
  assert float(state.latent_std) > 0  # measured at the end and saved with the checkpoint
  saved, step = checkpoints.load_state_tree(str(workdir))
  assert step == 16 and float(saved["latent_std"]) == float(state.latent_std)


def test_vae_resume_is_bitwise_equal(trained_vae, shapes_data_dir, lpips_file, tmp_path):
  _, straight = trained_vae
  config = _vae_config(shapes_data_dir, lpips_file, total_steps=8)
  trainer.train_and_evaluate(config, str(tmp_path), VAEStage(config))
  config = _vae_config(shapes_data_dir, lpips_file)
  resumed = _host(trainer.train_and_evaluate(config, str(tmp_path), VAEStage(config)))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_decoder_distill_freezes_the_encoder_and_keeps_the_latent_scale(
  trained_vae, shapes_data_dir, lpips_file, tmp_path
):
  vae_dir, source = trained_vae
  config = config_utils.load_config(REPO / "configs/decoder_distill.py:tiny")
  base = _vae_config(shapes_data_dir, lpips_file)
  for key in ("data", "model", "global_batch_size", "perceptual", "optimizer", "mesh"):
    config[key] = base[key]
  config.gan.discriminator = base.gan.discriminator
  config.num_train_steps, config.log_every, config.sample_every = 4, 2, 0
  config.report_every_secs = 1000
  config.init_checkpoint = str(vae_dir)
  stage = VAEStage(config)
  state = _host(trainer.train_and_evaluate(config, str(tmp_path), stage))

  assert set(state.autoencoder.params) == {"decoder"}
  for a, b in zip(jax.tree.leaves(source.autoencoder.params["encoder"]),
                  jax.tree.leaves(state.frozen["encoder"])):  # fmt: skip
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
    source.autoencoder.params["decoder"]["conv_out"]["bias"],
    state.frozen["teacher_decoder"]["conv_out"]["bias"],
  )
  assert float(state.latent_std) == float(source.latent_std)
  assert not _scalars(tmp_path, "kl") and _scalars(tmp_path, "distill")  # no KL term

  # A stage started from a run of a stage it cannot start from is named before anything compiles.
  wrong = config_utils.load_config(REPO / "configs/diffusion.py:tiny")
  wrong.data, wrong.init_checkpoint = base.data, str(tmp_path)
  with pytest.raises(ValueError, match=r"is a 'decoder_distill' run; a DiffusionStage starts from"):
    trainer.train_and_evaluate(wrong, str(tmp_path / "wrong"), DiffusionStage(wrong))
  assert not (tmp_path / "wrong" / "checkpoints").exists()

  # The diffusion stage takes its latent space from this checkpoint: light decoder, 1/std scale.
  dconfig = config_utils.load_config(REPO / "configs/diffusion.py:tiny")
  dconfig.latents.kind = "vae"
  dconfig.latents.checkpoint = str(tmp_path)
  space = latent_space.build_latent_space(dconfig)
  assert space.scale == pytest.approx(1.0 / float(source.latent_std))
  assert space.downsample == 8 and space.module.decoder.channels == 4
  dconfig.model.in_channels = 4
  with pytest.raises(ValueError, match="in_channels=4 but the VAE"):
    latent_space.build_latent_space(dconfig)


def test_vae_eval_scores_held_out_images_from_the_checkpoint_alone(trained_vae, shapes_data_dir):
  from md_jax.evaluation import vae_eval

  workdir, state = trained_vae
  result = vae_eval.evaluate(str(workdir), split="validation", num_images=16, batch_size=8)
  assert result["num_images"] == 16 and result["step"] == 16 and result["stage"] == "vae"
  assert result["latent_std"] == float(state.latent_std)
  # PSNR and MSE describe the same reconstructions: mean PSNR ≥ PSNR of the mean MSE (Jensen).
  assert 5 < result["psnr_db"] < 60
  assert result["psnr_db"] >= 10 * np.log10(1 / result["mse"]) - 1e-6
  with pytest.raises(ValueError, match="fewer than --batch_size"):
    vae_eval.evaluate(str(workdir), split="validation", num_images=16, batch_size=256)


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_pool_and_turn_is_a_2x_average_pool_then_quarter_turns(turns):
  x = np.random.default_rng(turns).normal(size=(2, 8, 8, 3)).astype(np.float32)
  expected = np.rot90(x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4)), k=turns, axes=(1, 2))
  got = jax.jit(pool_and_turn)(jnp.asarray(x), jnp.asarray(turns))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def _first_step_metrics(data_dir, **overrides):
  """The metrics of a freshly initialised vae stage's first step on fixed random images."""
  config = _vae_config(data_dir, "", **overrides)
  config.perceptual.weight = 0.0
  stage = VAEStage(config)
  state = nn.meta.unbox(stage.init_state(jax.random.key_data(jax.random.key(0))))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
  return jax.jit(stage.train_step)(state, {"image": images})[1]


def test_equivariance_term_adds_its_weighted_loss_and_reaches_the_gradient(shapes_data_dir):
  plain = _first_step_metrics(shapes_data_dir, equivariance_weight=0.0)
  eq = _first_step_metrics(shapes_data_dir, equivariance_weight=0.5)
  assert "equivariance" not in plain and float(eq["equivariance"]) > 0
  # Before gan.start_step the loss is the nll alone, so the term is exactly the difference.
  np.testing.assert_allclose(
    float(eq["loss"]) - float(plain["loss"]), 0.5 * float(eq["equivariance"]), rtol=1e-4
  )
  assert float(eq["reconstruction"]) == pytest.approx(float(plain["reconstruction"]), rel=1e-6)
  # The term reaches the gradient (step 0's warmup lr is 0, so compare gradients, not params).
  assert abs(float(eq["grad_norm"]) - float(plain["grad_norm"])) > 1e-4 * float(plain["grad_norm"])


def test_noised_latents_scale_with_the_latent_std_per_image_and_pass_gradients_through():
  z = 3.0 * jax.random.normal(jax.random.key(0), (64, 4, 4, 8))
  noise = noised_latents(z, jax.random.key(1), 0.5) - z
  per_image = np.asarray(jnp.std(noise, axis=(1, 2, 3)) / jnp.std(z))
  # τ ~ U(0, 0.5) per image: every image's noise is within the bound, and they differ.
  assert per_image.max() < 0.5 * 1.3 and per_image.min() < 0.1 and per_image.std() > 0.05
  np.testing.assert_array_equal(np.asarray(noised_latents(z, jax.random.key(1), 0.0)), z)
  # std(z) is a constant to the gradient: d(noised)/dz is the identity.
  grad = jax.grad(lambda x: jnp.sum(noised_latents(x, jax.random.key(1), 0.5)))(z)
  np.testing.assert_allclose(np.asarray(grad), 1.0, rtol=1e-6)


def test_latent_noise_changes_what_is_decoded_but_not_the_kl(shapes_data_dir):
  plain = _first_step_metrics(shapes_data_dir, latent_noise=0.0)
  noised = _first_step_metrics(shapes_data_dir, latent_noise=1.0)
  assert float(noised["kl"]) == pytest.approx(float(plain["kl"]), rel=1e-6)
  assert abs(float(noised["reconstruction"]) - float(plain["reconstruction"])) > 1e-6

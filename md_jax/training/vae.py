"""Stages `vae` and `decoder_distill` (paper Sec. 3.5): the f=8, c=8 autoencoder, its light decoder.

`vae`: L2 reconstruction + KL (small weight) + LPIPS perceptual + PatchGAN adversarial loss, the
generator (encoder + decoder) and the discriminator updated in one jitted step; optionally
EQ-VAE's equivariance term (`config.equivariance_weight`, off by default), and decoding noised
latents (`config.latent_noise`, off by default; `noised_latents`). At the end of the
run the std of the encoded latents on training images is measured and stored in the state, so
the checkpoint carries the scale the diffusion stage multiplies latents by.

`decoder_distill`: the encoder restored from a `vae` checkpoint and frozen, a decoder pruned in
width and depth (`model.light_decoder`) trained without the KL term, with a reduced adversarial
weight, and optionally (SnapFusion) an L2 term towards the full decoder's output for the same
latents. Leaves of the full decoder are copied into the light one where their shapes agree.

Loss scaling follows SD/taming: every term is a sum over pixels (latents for KL) divided by the
number of pixel values, so `kl_weight=1e-6` means what it means in SD's configs.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from md_jax.infra import checkpoints
from md_jax.models.discriminator import patch_discriminator_from_config
from md_jax.models.lpips import load_lpips
from md_jax.models.vae import (
  Autoencoder,
  autoencoder_from_config,
  autoencoder_params,
  decoder_from_config,
  psnr,
)
from md_jax.training import adversarial, optimizers
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState


class VAEState(flax.struct.PyTreeNode):
  autoencoder: TrainState  # trained: {"encoder", "decoder"} (vae) or {"decoder"} (decoder_distill)
  frozen: Any  # {} (vae); {"encoder"[, "teacher_decoder"]} (decoder_distill)
  discriminator: TrainState
  perceptual: Any  # frozen LPIPS params ({} when config.perceptual.weight is 0)
  latent_std: jax.Array  # std of encoded training latents; 0 until measured at the end of the run

  @property
  def step(self):
    return self.autoencoder.step


def pool_and_turn(x, turns):
  """(B, H, W, C) average-pooled 2× and rotated by `turns` (traced, 0–3) quarter turns."""
  b, h, w, c = x.shape
  pooled = jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))
  rotations = [functools.partial(jnp.rot90, k=k, axes=(1, 2)) for k in range(4)]
  return jax.lax.switch(turns, rotations, pooled)


def noised_latents(z, key, max_noise: float):
  """z + τ·std(z)·ε, τ ~ U(0, max_noise) per image: the latent the decoder is trained on with
  `config.latent_noise` (l-DeTok, Yang et al., 2025).

  A diffusion model decides each detail at the noise level where it stops being drowned in x_t.
  Codes that only a clean latent holds, such as a small shape's corners, are drowned early, so
  the UNet must guess them from the caption with little of the loss to learn that from (session
  20: a probe reads the kind from x_t at t = 300 at 0.57). A decoder that must reconstruct through
  noise makes the encoder write them robustly (the same probe: 0.98). std(z) is held constant
  so the encoder cannot outgrow the noise by scaling its latents up.
  """
  k_tau, k_eps = jax.random.split(key)
  tau = max_noise * jax.random.uniform(k_tau, (z.shape[0],) + (1,) * (z.ndim - 1))
  return z + tau * jax.lax.stop_gradient(jnp.std(z)) * jax.random.normal(k_eps, z.shape, z.dtype)


class VAEStage(Stage):
  starts_from = ("vae",)  # decoder_distill: the vae run whose encoder it freezes

  def __init__(self, config):
    self.config = config
    self.distill = config.stage == "decoder_distill"
    if self.distill:
      self.needs_init_checkpoint = "the vae run whose encoder is frozen"
    self.model = autoencoder_from_config(config.model, light=self.distill)
    self.teacher_decoder = None
    if self.distill and config.get("distill_weight", 0) > 0:
      self.teacher_decoder = decoder_from_config(config.model.decoder, config.model)
    self.discriminator = patch_discriminator_from_config(config.gan.discriminator)
    self.lpips, self._lpips_params = None, None
    if config.perceptual.weight > 0:
      if not config.perceptual.weights:
        raise ValueError(
          "config.perceptual.weights is empty but config.perceptual.weight > 0: convert the "
          "VGG16/LPIPS weights once (python -m md_jax.tools.convert_lpips) or set the weight to 0"
        )
      self.lpips, self._lpips_params = load_lpips(config.perceptual.weights)
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.lr_schedule = optimizers.learning_rate_schedule(config.optimizer)
    self.d_tx = optimizers.create_optimizer(config.gan.optimizer)

  # --- Stage hooks ------------------------------------------------------------------------

  def init_state(self, rng) -> VAEState:
    key = jax.random.wrap_key_data(rng)
    k_ae, k_d, k_teacher, k_lpips = jax.random.split(key, 4)
    res = self.config.data.resolution
    images = jnp.zeros((1, res, res, 3))
    params = self.model.init(k_ae, images)["params"]
    frozen = {}
    if self.distill:  # the encoder comes from the vae checkpoint (`initialize_from`)
      frozen["encoder"] = params.pop("encoder")
      if self.teacher_decoder is not None:
        latents = jnp.zeros((1, *self.latent_shape(res)))
        frozen["teacher_decoder"] = self.teacher_decoder.init(k_teacher, latents)["params"]
    d_params = self.discriminator.init(k_d, images)["params"]
    perceptual = {} if self.lpips is None else self.lpips.init(k_lpips, images, images)["params"]
    return VAEState(
      autoencoder=TrainState.create(
        params=params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
      ),
      frozen=frozen,
      discriminator=TrainState.create(params=d_params, tx=self.d_tx, rng=rng, ema_decay=0.0),
      perceptual=perceptual,
      latent_std=jnp.zeros((), jnp.float32),
    )

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    f = 2 ** (len(self.config.model.encoder.channel_mult) - 1)
    return resolution // f, resolution // f, self.config.model.latent_channels

  def train_step(self, state: VAEState, batch):
    config, gan = self.config, self.config.gan
    images = batch["image"]
    num_values = np.prod(images.shape[1:])
    step = state.autoencoder.step
    # Before `gan.start_step` the adversarial terms are multiplied by 0 (still computed: one
    # compiled step for the whole run, and D's Adam moments stay zero until it starts).
    adv_on = jnp.where(step >= gan.start_step, 1.0, 0.0) * (gan.weight > 0)

    def generator_losses(params):
      params = {**state.frozen, **params}
      posterior = self.model.apply({"params": params}, images, method=Autoencoder.encode)
      z = posterior.sample(state.autoencoder.step_rng())
      latent_noise = config.get("latent_noise", 0.0)  # configs saved before it: 0
      if not self.distill and latent_noise > 0:
        z = noised_latents(z, state.autoencoder.step_rng(2), latent_noise)
      recon = self.model.apply({"params": params}, z, method=Autoencoder.decode)
      terms = {"reconstruction": jnp.mean(jnp.square(images - recon))}
      nll = terms["reconstruction"]
      if not self.distill:
        terms["kl"] = jnp.mean(posterior.kl()) / num_values
        nll += config.kl_weight * terms["kl"]
      equivariance_weight = config.get("equivariance_weight", 0)  # configs saved before it: 0
      if not self.distill and equivariance_weight > 0:
        # A latent that decodes well only at its own scale and orientation is full of codes a
        # diffusion model must learn to place exactly; one that commutes with pooling and
        # rotation is closer to a small image, which a UNet learns faster (EQ-VAE, Sec. 3).
        turns = jax.random.randint(state.autoencoder.step_rng(1), (), 0, 4)
        turned = self.model.apply(
          {"params": params}, pool_and_turn(z, turns), method=Autoencoder.decode
        )
        terms["equivariance"] = jnp.mean(jnp.square(pool_and_turn(images, turns) - turned))
        nll += equivariance_weight * terms["equivariance"]
      if self.lpips is not None:
        terms["perceptual"] = jnp.mean(
          self.lpips.apply({"params": state.perceptual}, images, recon)
        )
        nll += config.perceptual.weight * terms["perceptual"]
      if self.teacher_decoder is not None:
        teacher = self.teacher_decoder.apply({"params": params["teacher_decoder"]}, z)
        terms["distill"] = jnp.mean(jnp.square(jax.lax.stop_gradient(teacher) - recon))
        nll += config.distill_weight * terms["distill"]
      fake_logits = self.discriminator.apply({"params": state.discriminator.params}, recon)
      g_adv = adversarial.generator_loss(fake_logits, gan.loss)
      return (nll, g_adv), (recon, terms)

    (nll, g_adv), vjp, (recon, terms) = jax.vjp(
      generator_losses, state.autoencoder.params, has_aux=True
    )
    # Both losses share one forward pass; the gradient of nll + w·g_adv is one pullback with
    # cotangent (1, w). The adaptive w needs each term's gradient at the decoder's last kernel:
    # a Jacobian w.r.t. that kernel alone, whose backward pass stops at the last layer (its
    # forward is the same computation as above, which XLA deduplicates).
    adv_weight = gan.weight * adv_on
    if gan.adaptive_weight:
      params = state.autoencoder.params
      last = params["decoder"]["conv_out"]

      def losses_given_last_kernel(kernel):
        decoder = {**params["decoder"], "conv_out": {**last, "kernel": kernel}}
        return generator_losses({**params, "decoder": decoder})[0]

      nll_last, adv_last = jax.jacrev(losses_given_last_kernel)(last["kernel"])
      adv_weight *= adversarial.adaptive_weight(nll_last, adv_last)
    (grads,) = vjp((jnp.ones(()), adv_weight))

    def discriminator_loss(d_params):
      both = jnp.concatenate([images, jax.lax.stop_gradient(recon)])
      real, fake = jnp.split(self.discriminator.apply({"params": d_params}, both), 2)
      return adv_on * adversarial.discriminator_loss(real, fake, gan.loss), (real, fake)

    (d_loss, (real, fake)), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
      state.discriminator.params
    )
    metrics = {
      "loss": nll + adv_weight * g_adv,
      **terms,
      "psnr": jnp.mean(psnr(images, recon)),
      "generator_adversarial": g_adv,
      "adversarial_weight": adv_weight,
      "discriminator_loss": d_loss,
      "logits_real": jnp.mean(real),
      "logits_fake": jnp.mean(fake),
      "grad_norm": optax.global_norm(grads),
      "lr": self.lr_schedule(step),
    }
    new_state = state.replace(
      autoencoder=state.autoencoder.apply_gradients(grads),
      discriminator=state.discriminator.apply_gradients(d_grads),
    )
    return new_state, metrics

  def sample_images(self, state: VAEState, batch, num: int = 8):
    """Validation-style reconstructions (posterior mean): originals above, reconstructions below."""
    images = batch["image"][:num]
    recon = self.reconstruct(self.inference_params(state), images)
    both = jnp.concatenate([images, recon])
    return np.asarray(jnp.clip(jnp.round((both + 1) * 127.5), 0, 255).astype(jnp.uint8))

  def inference_params(self, state: VAEState) -> dict:
    """{"encoder", "decoder"}: trained parts (EMA when `config.eval_ema`) and frozen ones."""
    trained = state.autoencoder.ema_params if self.config.eval_ema else state.autoencoder.params
    return autoencoder_params(state.frozen, trained)

  @functools.partial(jax.jit, static_argnums=0)
  def reconstruct(self, params, images):
    recon, _ = self.model.apply({"params": params}, images)
    return recon

  def finalize(self, state: VAEState, batches) -> VAEState:
    """Measures the std of sampled latents over `config.latent_std_batches` training batches."""
    if self.distill and float(state.latent_std) > 0:
      return state  # the frozen encoder's std, carried over from the vae checkpoint
    params = self.inference_params(state)
    total, total_sq, count = 0.0, 0.0, 0
    for i, batch in zip(range(self.config.latent_std_batches), batches):
      s, sq, n = self._latent_moments(params, batch["image"], jax.random.key(i))
      total, total_sq, count = total + float(s), total_sq + float(sq), count + int(n)
    mean = total / count
    std = np.sqrt(max(total_sq / count - mean * mean, 0.0))
    return state.replace(latent_std=jnp.asarray(std, jnp.float32))

  @functools.partial(jax.jit, static_argnums=0)
  def _latent_moments(self, params, images, key):
    posterior = self.model.apply({"params": params}, images, method=Autoencoder.encode)
    z = posterior.sample(key).astype(jnp.float32)
    return jnp.sum(z), jnp.sum(jnp.square(z)), z.size

  def load_pretrained(self, state: VAEState) -> VAEState:
    if self._lpips_params is None:
      return state
    return state.replace(perceptual=self._lpips_params)

  def initialize_from(self, state: VAEState, source) -> VAEState:
    """`decoder_distill` from a `vae` run: frozen encoder, decoder leaves where shapes fit."""
    src = source["autoencoder"]
    src_params = src["ema_params"] if self.config.eval_ema else src["params"]
    frozen = {"encoder": checkpoints.copy_into(src_params["encoder"], state.frozen["encoder"])}
    if self.teacher_decoder is not None:
      frozen["teacher_decoder"] = checkpoints.copy_into(
        src_params["decoder"], state.frozen["teacher_decoder"]
      )
    decoder = state.autoencoder.params["decoder"]  # from scratch, or where shapes allow:
    if self.config.get("light_decoder_from_full", True):
      decoder = checkpoints.copy_into(src_params["decoder"], decoder, strict=False)
    params = {**state.autoencoder.params, "decoder": decoder}
    d_params = checkpoints.copy_into(
      source["discriminator"]["params"], state.discriminator.params, strict=False
    )
    return state.replace(
      autoencoder=state.autoencoder.replace(
        params=params, ema_params=params, opt_state=self.tx.init(params)
      ),
      frozen=frozen,
      discriminator=state.discriminator.replace(
        params=d_params, ema_params=d_params, opt_state=self.d_tx.init(d_params)
      ),
      latent_std=np.asarray(source["latent_std"], np.float32),
    )

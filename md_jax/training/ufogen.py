"""Stage `ufogen`: one-step diffusion-GAN finetuning (paper Sec. 4, Eq. 1–3; Xu et al., 2023).

Generator G and discriminator D both start from the pretrained diffusion UNet
(`config.init_checkpoint`, its EMA params). Per step, with t ~ U[jump, T) and t' = t − jump:

    x_t ~ q(x_t | x0);   x0' = G(x_t, t, c)                    (read through the UNet's prediction)
    real x_{t'} ~ q(x_{t'} | x0),   fake x'_{t'} ~ q(x_{t'} | x0')   (fresh noise each)
    L_G = adv(D(x'_{t'}, t', c)) + λ·E[γ_t·‖target − x0'‖²]  [+ μ·CE(C(x'_{t'}, t'), y)]
    L_D = adv_D(D(x_{t'}, t', c), D(sg(x'_{t'}), t', c))

target (`ufogen.objective`): "diffusion" x0 itself (Eq. 1, the paper's final choice); "distill" the
frozen pretrained UNet's x0 at x_t (Eq. 2); "ema_distill" the EMA generator's (Eq. 3). The
adversarial gradient reaches G through D's input x'_{t'}, which is a differentiable function of
x0'. `ufogen.lora.rank` > 0 trains LoRA factors on G's kernels only (null-initialised, so G starts
as the pretrained UNet); D always trains in full. G and D are two TrainStates with their own
optimizers (D: Adam with β1 = 0), updated in one jitted step; G keeps an EMA.

The optional last term (`ufogen.classifier`, weight μ) is an auxiliary classifier's, as in AC-GAN
(Odena et al., 2017), with a frozen `latent_classifier` run C in place of a head on D: the
cross-entropy of the caption's attributes y read from the fake x'_{t'} that D sees. The x0 term
pulls G's one step toward the posterior mean, which at t ≈ T keeps colours and places but blurs
the outline that makes a shape's kind; C names the kind at t' < 250 (BENCHMARKS.md, session 21).

The state keeps G's TrainState under `unet`, where `pipeline/checkpoint_layout.py` declares
every diffusion-family checkpoint keeps the UNet it samples with: a ufogen checkpoint is read as a
diffusion one (`--sampler=ufogen --steps=1`).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from md_jax.infra import checkpoints
from md_jax.models import lora
from md_jax.models.discriminator import UNetDiscriminator
from md_jax.pipeline.checkpoint_layout import InferenceParams, trained_params
from md_jax.pipeline.text_to_image import TextToImage
from md_jax.training import adversarial, latent_classifier, optimizers
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState

OBJECTIVES = ("diffusion", "distill", "ema_distill")
GAMMAS = ("constant", "snr", "alpha")


class UFOGenState(flax.struct.PyTreeNode):
  unet: TrainState  # G: full UNet params, or LoRA factors over `frozen["unet"]`
  discriminator: TrainState
  # {"unet": pretrained UNet} when LoRA's base or the distill teacher needs it; {"classifier":
  # its params} with `ufogen.classifier`
  frozen: Any
  text_encoder: Any  # frozen params
  autoencoder: Any  # frozen params

  @property
  def step(self):
    return self.unet.step


def reconstruction_weight(kind: str, schedule, t):
  """γ_t. "constant" (default): every t counts alike — one-step sampling starts at t = T−1,
  where SNR-based weights would all but switch the x0 term off exactly where G needs it most.
  "snr": ᾱ_t/(1−ᾱ_t), clipped at 5 (the min-SNR cap); "alpha": ᾱ_t."""
  if kind == "constant":
    return jnp.ones(t.shape, jnp.float32)
  if kind == "snr":
    return jnp.minimum(schedule.snr(t), 5.0)
  if kind == "alpha":
    return schedule.alphas_cumprod[t]
  raise ValueError(f"config.ufogen.gamma={kind!r}: expected one of {GAMMAS}")


def generator_unet_params(config, params, frozen):
  """The UNet params G applies: `params` merged as LoRA factors into `frozen["unet"]` for the LoRA
  variant, else `params` themselves. Works on a state's leaves and on a restored tree's."""
  rank = config.ufogen.lora.rank
  if rank <= 0:
    return params
  return lora.merge(frozen["unet"], params, config.ufogen.lora.alpha, rank)


def discriminator_optimizer(d_config) -> optax.GradientTransformation:
  """D's optimizer, its updates to the pretrained UNet body scaled by `body_lr_scale`.

  The head starts from scratch and must move fast; the body is a pretrained UNet, and Adam (which
  moves every weight by ~lr per step, whatever its gradient) at the head's lr wipes out its input
  dependence within ~100 steps: D's logits then sit at 0 for every input (BENCHMARKS.md, UFOGen).
  """
  tx = optimizers.create_optimizer(d_config.optimizer)
  scale = d_config.get("body_lr_scale", 1.0)
  if scale == 1.0:
    return tx

  def is_body(params):
    return {name: name == "unet" for name in params}

  return optax.chain(tx, optax.masked(optax.scale(scale), is_body))


class UFOGenStage(Stage):
  starts_from = ("diffusion", "relu_finetune")
  needs_init_checkpoint = "the diffusion run G and D start from (its workdir or a checkpoint)"

  def __init__(self, config, tokenizer=None):
    uf = config.ufogen
    if uf.objective not in OBJECTIVES:
      raise ValueError(f"config.ufogen.objective={uf.objective!r}: expected one of {OBJECTIVES}")
    if uf.gamma not in GAMMAS:
      raise ValueError(f"config.ufogen.gamma={uf.gamma!r}: expected one of {GAMMAS}")
    if uf.discriminator.features not in ("mid", "last"):
      raise ValueError(
        f"config.ufogen.discriminator.features={uf.discriminator.features!r}: 'mid' or 'last'"
      )
    self.config = config
    self.pipeline = TextToImage.from_config(config, tokenizer=tokenizer)
    self.unet = self.pipeline.unet
    self.schedule = self.pipeline.schedule
    self.discriminator = UNetDiscriminator(self.unet, features=uf.discriminator.features)
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.d_tx = discriminator_optimizer(uf.discriminator)
    self.lora_rank = uf.lora.rank
    self.needs_frozen_unet = self.lora_rank > 0 or uf.objective == "distill"
    if uf.jump <= 0 or uf.jump >= self.schedule.num_steps:
      raise ValueError(
        f"config.ufogen.jump={uf.jump}: expected 0 < jump < {self.schedule.num_steps}"
      )
    # The auxiliary classifier, or None (configs saved before it have none).
    res = config.data.resolution
    self.classifier = latent_classifier.training_guide(
      uf.get("classifier"), config, self.pipeline, what="config.ufogen.classifier",
      phase_latent_shapes={res: self.pipeline.latent_shape(res)},
    )  # fmt: skip
    if (
      self.classifier is not None
      and self.classifier.max_timestep < self.schedule.num_steps - 1 - uf.jump
    ):
      raise ValueError(
        f"config.ufogen.classifier reads t' ≤ {self.classifier.max_timestep}, and jump "
        f"{uf.jump} gives t' up to {self.schedule.num_steps - 1 - uf.jump}: raise the jump"
      )

  # --- Stage hooks ------------------------------------------------------------------------

  def init_state(self, rng) -> UFOGenState:
    key = jax.random.wrap_key_data(rng)
    res = self.config.data.resolution
    # The pretrained model's shapes only: `initialize_from` puts in the trained values.
    base = self.pipeline.placeholder_params(res)
    unet_params = base.unet
    latents = jnp.zeros((1, *self.pipeline.latent_shape(res)))
    text = jnp.zeros((1, self.unet.text_length, self.unet.text_dim))
    t = jnp.zeros((1,), jnp.int32)
    d_params = self.discriminator.init(jax.random.fold_in(key, 1), latents, t, text)["params"]
    frozen = {"unet": unet_params} if self.needs_frozen_unet else {}
    if self.classifier is not None:
      frozen["classifier"] = latent_classifier.init_guide_params(self.classifier)
    g_params = unet_params
    if self.lora_rank > 0:
      g_params = lora.init_lora(unet_params, self.lora_rank, jax.random.fold_in(key, 2))
    ema = self.config.ema_decay
    return UFOGenState(
      unet=TrainState.create(params=g_params, tx=self.tx, rng=rng, ema_decay=ema),
      discriminator=TrainState.create(params=d_params, tx=self.d_tx, rng=rng, ema_decay=0.0),
      frozen=frozen,
      text_encoder=base.text_encoder,
      autoencoder=base.autoencoder,
    )

  def noised_inputs(self, state: UFOGenState, batch, rng) -> dict:
    """What one step compares, for a batch: the text, x0, t ~ U[jump, T), x_t ~ q(x_t|x0),
    t' = t − jump, a real x_{t'} ~ q(x_{t'}|x0), and the fresh noise that makes the fake one."""
    keys = jax.random.split(rng, 4)
    text = jax.lax.stop_gradient(self.pipeline.encode_text(state.text_encoder, batch["tokens"]))
    x0 = self.pipeline.latent_space.encode(state.autoencoder, batch["image"])
    jump = self.config.ufogen.jump
    t = jax.random.randint(keys[0], (x0.shape[0],), jump, self.schedule.num_steps)
    t_prev = t - jump
    return {
      "text": text,
      "x0": x0,
      "t": t,
      "t_prev": t_prev,
      "x_t": self.schedule.add_noise(x0, jax.random.normal(keys[1], x0.shape), t),
      "real_prev": self.schedule.add_noise(x0, jax.random.normal(keys[2], x0.shape), t_prev),
      "fake_noise": jax.random.normal(keys[3], x0.shape),
    }

  def predict_x0(self, unet_params, x_t, t, text):
    """x0' = G(x_t, t, c), read through the UNet's prediction (ε or v)."""
    out = self.unet.apply({"params": unet_params}, x_t, t, text)
    return self.schedule.to_x0_and_eps(out, x_t, t, self.pipeline.prediction)[0]

  def discriminator_loss(self, d_params, real_prev, fake_prev, t_prev, text):
    """D's GAN loss on a real and a fake x_{t'} per caption, in one batch; also the logits."""
    both = jnp.concatenate([real_prev, fake_prev])
    logits = self.discriminator.apply(
      {"params": d_params}, both, jnp.concatenate([t_prev, t_prev]), jnp.concatenate([text, text])
    )
    real, fake = jnp.split(logits, 2)
    return adversarial.discriminator_loss(real, fake, self.config.ufogen.gan_loss), (real, fake)

  def train_step(self, state: UFOGenState, batch):
    uf = self.config.ufogen
    inputs = self.noised_inputs(state, batch, state.unet.step_rng())
    x0, t, t_prev, x_t, text = (inputs[k] for k in ("x0", "t", "t_prev", "x_t", "text"))

    if uf.objective == "diffusion":
      target = x0
    elif uf.objective == "distill":  # the frozen pretrained UNet's x0 (Eq. 2)
      target = jax.lax.stop_gradient(self.predict_x0(state.frozen["unet"], x_t, t, text))
    else:  # "ema_distill": the EMA generator's x0 (Eq. 3)
      ema = generator_unet_params(self.config, state.unet.ema_params, state.frozen)
      target = jax.lax.stop_gradient(self.predict_x0(ema, x_t, t, text))
    gamma = reconstruction_weight(uf.gamma, self.schedule, t)

    def generator_loss(g_params):
      g_unet = generator_unet_params(self.config, g_params, state.frozen)
      x0_pred = self.predict_x0(g_unet, x_t, t, text)
      fake_prev = self.schedule.add_noise(x0_pred, inputs["fake_noise"], t_prev)
      fake_logits = self.discriminator.apply(
        {"params": state.discriminator.params}, fake_prev, t_prev, text
      )
      adv = adversarial.generator_loss(fake_logits, uf.gan_loss)
      per_example = jnp.mean(jnp.square(target - x0_pred), axis=(1, 2, 3))
      reconstruction = jnp.mean(gamma * per_example)
      loss = uf.adversarial_weight * adv + uf.reconstruction_weight * reconstruction
      terms = {"generator_adversarial": adv, "reconstruction": reconstruction}
      if self.classifier is not None:
        classifier = latent_classifier.batch_guide(
          self.classifier, state.frozen["classifier"], batch
        )
        terms["classifier"] = -jnp.mean(classifier.log_prob(fake_prev, t_prev))
        loss = loss + self.classifier.scale * terms["classifier"]
      return loss, (fake_prev, terms)

    (loss, (fake_prev, terms)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
      state.unet.params
    )
    fake_prev = jax.lax.stop_gradient(fake_prev)
    (d_loss, (real, fake)), d_grads = jax.value_and_grad(self.discriminator_loss, has_aux=True)(
      state.discriminator.params, inputs["real_prev"], fake_prev, t_prev, text
    )
    metrics = {
      "loss": loss,
      **terms,
      "discriminator_loss": d_loss,
      "logits_real": jnp.mean(real),
      "logits_fake": jnp.mean(fake),
      "grad_norm": optax.global_norm(grads),
      "discriminator_grad_norm": optax.global_norm(d_grads),
    }
    new_state = state.replace(
      unet=state.unet.apply_gradients(grads),
      discriminator=state.discriminator.apply_gradients(d_grads),
    )
    return new_state, metrics

  def text_to_image(self, state: UFOGenState):
    """G (EMA params, a LoRA generator's factors merged) with the frozen text encoder and
    autoencoder."""
    params = InferenceParams(
      unet=generator_unet_params(self.config, state.unet.ema_params, state.frozen),
      text_encoder=state.text_encoder,
      autoencoder=state.autoencoder,
    )
    return self.pipeline, params

  def sample_images(self, state: UFOGenState, batch, num: int = 8):
    """G's one-step samples (EMA params) for the batch's first `num` captions, as uint8."""
    return self.pipeline.generate(
      self.text_to_image(state)[1],
      batch["tokens"][:num],
      seed=jax.random.key(self.config.seed),
      resolution=batch["image"].shape[1],
      sampler="ufogen",
      steps=1,
    )

  def initialize_from(self, state: UFOGenState, source) -> UFOGenState:
    """G and D's body from the diffusion run's UNet (EMA), its text encoder and autoencoder."""
    unet = source["unet"]["ema_params" if self.config.get("init_from_ema", True) else "params"]
    template = state.frozen["unet"] if self.needs_frozen_unet else state.unet.params
    pretrained = checkpoints.copy_into(unet, template)
    d_params = dict(state.discriminator.params)  # the state is already unboxed
    d_params["unet"] = checkpoints.copy_into(unet, d_params["unet"])
    frozen = {"unet": pretrained} if self.needs_frozen_unet else {}
    if self.classifier is not None:
      frozen["classifier"] = latent_classifier.load_guide_params(
        self.classifier, state.frozen["classifier"]
      )
    if self.lora_rank > 0:
      g = state.unet  # LoRA factors stay as initialised: B = 0, so G = the pretrained UNet
    else:
      g = state.unet.replace(
        params=pretrained, ema_params=pretrained, opt_state=self.tx.init(pretrained)
      )
    return state.replace(
      unet=g,
      discriminator=state.discriminator.replace(
        params=d_params, opt_state=self.d_tx.init(d_params)
      ),
      frozen=frozen,
      text_encoder=checkpoints.copy_into(
        trained_params(source["text_encoder"]), state.text_encoder
      ),
      autoencoder=checkpoints.copy_into(source["autoencoder"], state.autoencoder),
    )

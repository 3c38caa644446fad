"""Stage `diffusion` (and `relu_finetune`): text-conditioned latent diffusion training (Sec. 5.1).

CLIP text encoder → frozen image encoder (latents) → noised latents → UNet → ε or v loss,
optionally min-SNR weighted per timestep and edge weighted per location (and optionally joined by
a frozen latent classifier's cross-entropy of the caption's attributes on x̂_0, or by the alignment
of the UNet's middle with that classifier's map of the clean latent), with 10% of captions
replaced by the empty prompt so the same model serves classifier-free guidance. The UNet is
optimised, and the text encoder too when `config.text_encoder.train` (a randomly initialised one
has nothing to keep frozen); the frozen parts live in the state too, so a checkpoint alone
rebuilds the whole text-to-image model.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from md_jax.data import tokenizer as tokenizer_lib
from md_jax.diffusion import samplers, schedules
from md_jax.models.unet import UNet, null_text_embedding
from md_jax.training import (
  checkpoints,
  latent_classifier,
  optimizers,
  representation_alignment,
  trainer,
)
from md_jax.training.diffusion_params import build_text_encoder, text_encoder_params
from md_jax.training.latent_space import LatentSpace, build_latent_space, encode_images
from md_jax.training.loss_weights import edge_loss_weights, min_snr_weight
from md_jax.training.train_state import TrainState


class DiffusionState(flax.struct.PyTreeNode):
  unet: TrainState
  text_encoder: Any  # CLIP params when frozen; a TrainState when `config.text_encoder.train`
  autoencoder: Any  # frozen image-encoder params ({} for pixel space)
  # The frozen latent classifier of `config.classifier_loss` ({} without one).
  classifier: Any = flax.struct.field(default_factory=dict)
  # The frozen latent classifier of `config.representation_alignment` ({} without one).
  representation_encoder: Any = flax.struct.field(default_factory=dict)

  @property
  def step(self):
    return self.unet.step


class DiffusionStage:
  def __init__(self, config, tokenizer=None, latent_space: LatentSpace | None = None):
    """`latent_space` replaces the one `config.latents` names (e.g. a random-init VAE for a
    latency benchmark, where no checkpoint exists)."""
    self.config = config
    self.tokenizer = tokenizer or tokenizer_lib.load_tokenizer(config.data.tokenizer_dir or None)
    self.unet = UNet.from_config(config.model)
    self.text_encoder, self._pretrained_text_params = build_text_encoder(config, self.tokenizer)
    self.latent_space = latent_space or build_latent_space(config)
    self.autoencoder = self.latent_space.module
    self.schedule = schedules.from_config(config.schedule)
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.lr_schedule = optimizers.learning_rate_schedule(config.optimizer)
    # The unconditional branch of classifier-free guidance: the UNet's learned null embedding when
    # it has one (`model.learned_null_text`), else the empty prompt's, as in SD.
    self.null_tokens = jnp.asarray(tokenizer_lib.tokenize(self.tokenizer, [""])[0])
    self.prediction = config.prediction
    self.train_text_encoder = bool(config.text_encoder.get("train", False))
    self.edge_weight = float(config.get("edge_weight", 0.0))  # configs saved before it: 0
    if self.edge_weight < 0:
      raise ValueError(f"config.edge_weight={self.edge_weight}: expected ≥ 0 (0 turns it off)")
    # Where the classifier loss scores and reads (configs saved before them: every t, from 0).
    loss_config = config.get("classifier_loss") or {}
    self.classifier_loss_max_timestep = int(
      loss_config.get("max_timestep", self.schedule.num_steps - 1)
    )
    if self.classifier_loss_max_timestep < 0:
      raise ValueError(
        f"config.classifier_loss.max_timestep={self.classifier_loss_max_timestep}: expected ≥ 0"
      )
    self.classifier_loss_min_read_timestep = int(loss_config.get("min_read_timestep", 0))

  @functools.cached_property
  def classifier(self):
    """The frozen latent classifier of `config.classifier_loss`, or None. Loaded on first use, so
    sampling from a run (which rebuilds this stage from the run's config) does not need the
    classifier's run. That first use can be inside the traced `init_state`: the checkpoint is
    read, and checked, eagerly all the same."""
    with jax.ensure_compile_time_eval():
      return latent_classifier.training_guide(
        self.config.get("classifier_loss"),
        self,
        what="config.classifier_loss",
        phase_latent_shapes=self._phase_latent_shapes(),
      )

  @functools.cached_property
  def representation_encoder(self):
    """The frozen latent classifier of `config.representation_alignment` (its `scale` the loss's
    weight), or None; loaded on first use, as `classifier` is."""
    with jax.ensure_compile_time_eval():
      return representation_alignment.load_encoder(
        self.config.get("representation_alignment"),
        self,
        what="config.representation_alignment",
        phase_latent_shapes=self._phase_latent_shapes(),
      )

  def _phase_latent_shapes(self):
    resolutions = [phase.resolution for phase in trainer.phases_from_config(self.config)]
    return {r: self.latent_shape(r) for r in resolutions}

  def classifier_reads(self, x_t) -> bool:
    """Whether the classifier loss applies to this batch: only to latents of the classifier's
    size (a progressive run's other phases train on the plain loss)."""
    return self.classifier is not None and x_t.shape[1:] == self.classifier.latent_shape

  def aligns_representation(self, x_t) -> bool:
    """Whether representation alignment applies to this batch: as `classifier_reads`, or in every
    phase with `representation_alignment.every_phase` (the encoder's map is convolutional, so it
    reads a smaller phase's latents too, if off the size it was trained on)."""
    encoder = self.representation_encoder
    if encoder is None:
      return False
    every_phase = self.config.representation_alignment.get("every_phase", False)
    return every_phase or x_t.shape[1:] == encoder.latent_shape

  def classifier_loss(self, classifier_params, batch, pred, x_t, t, drop, key):
    """The classifier's cross-entropy of each caption's attributes, read from the model's x̂_0
    (`latent_classifier.denoised_cross_entropy`), over the captioned examples noised to
    t ≤ `classifier_loss.max_timestep`.

    Why: no change to the plain loss taught the UNet the kinds from the caption (BENCHMARKS.md,
    sessions 10–20): a kind lives in a few outline pixels whose squared error is small. This term
    scores x̂_0 on the attributes themselves, and its gradient reaches the UNet through x̂_0.
    """
    classifier = latent_classifier.batch_guide(self.classifier, classifier_params, batch)
    x0_hat = self.schedule.to_x0_and_eps(pred.astype(jnp.float32), x_t, t, self.prediction)[0]
    scored = ~drop & (t <= self.classifier_loss_max_timestep)
    return latent_classifier.denoised_cross_entropy(
      classifier, self.schedule, x0_hat, t, scored, key, self.classifier_loss_min_read_timestep
    )

  # --- pieces shared by training, sampling and export --------------------------------------

  def encode_text(self, text_params, tokens):
    return self.text_encoder.apply({"params": text_params}, tokens).last_hidden_state

  def null_text(self, unet_params, text_params, batch: int):
    """The unconditional text of classifier-free guidance for `batch` captions: the UNet's
    learned null embedding when it has one, else the encoded empty prompt."""
    if self.unet.learned_null_text:
      return null_text_embedding(unet_params, batch)
    null_tokens = jnp.broadcast_to(self.null_tokens, (batch, *self.null_tokens.shape))
    return self.encode_text(text_params, null_tokens)

  def encode_images(self, autoencoder_params, images):
    return encode_images(self.latent_space, autoencoder_params, images)

  def decode_latents(self, autoencoder_params, latents):
    if self.autoencoder is None:
      return latents
    return self.autoencoder.apply(
      {"params": autoencoder_params},
      latents / self.latent_space.scale,
      method=type(self.autoencoder).decode,
    )

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    f = self.latent_space.downsample
    return resolution // f, resolution // f, self.config.model.in_channels

  # --- the Stage protocol -----------------------------------------------------------------

  def init_state(self, rng) -> DiffusionState:
    key = jax.random.wrap_key_data(rng)
    k_unet, k_text, k_ae, k_classifier = jax.random.split(key, 4)
    res = self.config.data.resolution
    latents = jnp.zeros((1, *self.latent_shape(res)))
    tokens = jnp.zeros((1, tokenizer_lib.CONTEXT_LENGTH), jnp.int32)
    text = jnp.zeros((1, tokenizer_lib.CONTEXT_LENGTH, self.config.model.text_dim))
    unet_params = self.unet.init(k_unet, latents, jnp.zeros((1,), jnp.int32), text)["params"]
    # Pretrained CLIP weights are put in by `load_pretrained` after this (traced) init.
    text_params = self.text_encoder.init(k_text, tokens)["params"]
    ae_params = {}
    if self.autoencoder is not None:
      ae_params = self.autoencoder.init(k_ae, jnp.zeros((1, res, res, 3)))["params"]
    unet_state = TrainState.create(
      params=unet_params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
    )
    if self.train_text_encoder:  # its own optimizer state and EMA, the UNet's settings
      text_params = TrainState.create(
        params=text_params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
      )
    return DiffusionState(
      unet=unet_state, text_encoder=text_params, autoencoder=ae_params,
      classifier=latent_classifier.init_guide_params(self.classifier, k_classifier),
      representation_encoder=latent_classifier.init_guide_params(
        self.representation_encoder, jax.random.fold_in(k_classifier, 1)
      ),
    )  # fmt: skip

  def loss(self, params, state: DiffusionState, batch):
    """(loss, {auxiliary term: value}) of `batch` for params = (UNet params, text-encoder
    params): what `train_step` differentiates. The draws of t, noise and dropped captions come
    from the state's step rng, so one state and batch always give the same draws."""
    k_t, k_noise, k_drop = jax.random.split(state.unet.step_rng(), 3)
    tokens = batch["tokens"]
    batch_size = tokens.shape[0]
    drop = jax.random.bernoulli(k_drop, self.config.condition_dropout, (batch_size,))
    if not self.unet.learned_null_text:  # else the UNet swaps in its own learned null embedding
      tokens = jnp.where(drop[:, None], self.null_tokens[None], tokens)
    x0 = self.encode_images(state.autoencoder, batch["image"])
    # Configs saved before `timesteps` existed drew them uniformly.
    t = schedules.sample_timesteps(
      k_t, batch_size, self.schedule.num_steps, self.config.get("timesteps")
    )
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = self.schedule.add_noise(x0, noise, t)
    target = noise if self.prediction == "eps" else self.schedule.v_target(x0, noise, t)
    with_classifier = self.classifier_reads(x_t)
    with_representation = self.aligns_representation(x_t)
    weights = jnp.ones((batch_size,))
    if self.config.get("min_snr_gamma", 0) > 0:
      weights = min_snr_weight(self.schedule.snr(t), self.config.min_snr_gamma, self.prediction)
    location_weights = 1.0
    if self.edge_weight > 0:
      location_weights = edge_loss_weights(x0, self.edge_weight)

    unet_params, text_params = params
    text = self.encode_text(text_params, tokens)
    drop_text = drop if self.unet.learned_null_text else None
    apply = functools.partial(
      self.unet.apply, {"params": unet_params}, x_t, t, text, drop_text=drop_text, train=True
    )
    x0_estimate = None
    if self.unet.self_condition:
      # Half the examples get the model's own x̂_0 (no gradient through it), half zeros: the
      # model learns both the first sampler step and the refining ones (Chen et al., 2023).
      first = jax.lax.stop_gradient(apply())
      x0_first = self.schedule.to_x0_and_eps(first, x_t, t, self.prediction)[0]
      use = jax.random.bernoulli(jax.random.fold_in(k_drop, 1), 0.5, (batch_size, 1, 1, 1))
      x0_estimate = jnp.where(use, x0_first, 0.0)
    if with_representation:
      pred, sown = apply(x0_estimate=x0_estimate, mutable=["intermediates"])
      (representation,) = sown["intermediates"]["innermost"]["representation"]
    else:
      pred = apply(x0_estimate=x0_estimate)
    squared = jnp.square(pred.astype(jnp.float32) - target) * location_weights
    per_example = jnp.mean(squared, axis=(1, 2, 3))
    loss = jnp.mean(weights * per_example)
    terms = {}
    if with_classifier:
      terms["classifier"] = self.classifier_loss(
        state.classifier, batch, pred, x_t, t, drop, jax.random.fold_in(k_drop, 2)
      )
      loss = loss + self.classifier.scale * terms["classifier"]
    if with_representation:
      encoder = self.representation_encoder
      features = representation_alignment.encoder_features(
        encoder.model, state.representation_encoder, x0
      )
      terms["representation"] = representation_alignment.cosine_alignment_loss(
        representation, features
      )
      loss = loss + encoder.scale * terms["representation"]
    return loss, terms

  def train_step(self, state: DiffusionState, batch):
    text_params = text_encoder_params(state.text_encoder, ema=False)
    # Differentiate only what trains. A frozen text encoder is closed over, so its backward pass
    # is never traced: a stop_gradient applied outside `grad` left it in the jaxpr (for XLA to
    # drop), where the benchmarks' model-FLOP count read it as work (BENCHMARKS.md, session 29).
    if self.train_text_encoder:
      (loss, terms), (grads, text_grads) = jax.value_and_grad(self.loss, has_aux=True)(
        (state.unet.params, text_params), state, batch
      )
    else:
      loss_of_unet = lambda unet_params: self.loss((unet_params, text_params), state, batch)
      (loss, terms), grads = jax.value_and_grad(loss_of_unet, has_aux=True)(state.unet.params)
    metrics = {
      "loss": loss,
      **terms,
      "grad_norm": optax.global_norm(grads),
      "lr": self.lr_schedule(state.unet.step),
    }
    state = state.replace(unet=state.unet.apply_gradients(grads))
    if self.train_text_encoder:
      metrics["text_grad_norm"] = optax.global_norm(text_grads)
      state = state.replace(text_encoder=state.text_encoder.apply_gradients(text_grads))
    return state, metrics

  def sample_images(self, state: DiffusionState, batch, num: int = 8):
    """Images for the batch's first `num` captions (EMA params, DDIM, CFG), as uint8."""
    return self.generate(
      state.unet.ema_params,
      text_encoder_params(state.text_encoder),
      state.autoencoder,
      batch["tokens"][:num],
      jax.random.key(self.config.seed),
      resolution=batch["image"].shape[1],
      steps=self.config.sample_steps,
      cfg=self.config.sample_cfg,
    )

  @functools.partial(
    jax.jit, static_argnums=0, static_argnames=("resolution", "sampler", "steps", "cfg", "eta")
  )
  def generate(
    self, unet_params, text_params, autoencoder_params, tokens, key, *,
    resolution: int, sampler: str = "ddim", steps: int = 50, cfg: float = 3.0, eta: float = 0.0,
    guide=None, classifier_guide=None,
  ):  # fmt: skip
    """Token ids (B, 77) → uint8 images (B, resolution, resolution, 3), one compiled program.

    `sampler`: "ddim" or "dpm++" (with classifier-free guidance at scale `cfg`; 1 = none), or
    "ufogen" (the one-step generator's sampler: `steps` G calls, no guidance). `eta`: DDIM's
    fresh-noise share (0 deterministic, 1 DDPM-like), its noise drawn from `key`; only for "ddim".
    `guide`: (UNet params, text params) of a weaker model of this architecture (e.g. an earlier
    checkpoint of the same run): ddim and dpm++ then use autoguidance at scale `cfg` instead of
    classifier-free guidance (`samplers.autoguidance`).
    `classifier_guide`: a `latent_classifier.ClassifierGuide` (a noise-aware classifier, the
    attributes each image asks for, scale and last guided t): ddim and dpm++ then add its
    classifier guidance to whichever of the above (`samplers.classifier_guidance`).
    """
    if eta != 0.0 and sampler != "ddim":
      raise ValueError(f"eta={eta} is DDIM's; sampler {sampler!r} takes no eta")
    if (guide is not None or classifier_guide is not None) and sampler == "ufogen":
      raise ValueError("guidance is for the ddim and dpm++ samplers; ufogen takes none")
    text = self.encode_text(text_params, tokens)
    self_condition = self.unet.self_condition

    def apply(params, text):  # (x, t[, x̂_0 of the previous step]) → the UNet's prediction
      return lambda x, t, *x0_estimate: self.unet.apply(
        {"params": params}, x, t, text, x0_estimate=x0_estimate[0] if x0_estimate else None
      )

    x_T = jax.random.normal(key, (len(tokens), *self.latent_shape(resolution)))
    if classifier_guide is not None and x_T.shape[1:] != classifier_guide.latent_shape:
      raise ValueError(
        f"the latent classifier reads {classifier_guide.latent_shape} latents, and resolution "
        f"{resolution} gives {x_T.shape[1:]}: generate at the resolution it was trained at"
      )
    if sampler == "ufogen":
      latents = samplers.ufogen_sample(
        apply(unet_params, text), self.schedule, x_T, steps, prediction=self.prediction, rng=key,
        self_condition=self_condition,
      )  # fmt: skip
    elif sampler in ("ddim", "dpm++"):
      if guide is not None:
        guide_unet, guide_text = guide
        guide_fn = apply(guide_unet, self.encode_text(guide_text, tokens))
        denoise = samplers.autoguidance(apply(unet_params, text), guide_fn, cfg)
      elif cfg == 1.0:
        denoise = apply(unet_params, text)
      else:
        null = self.null_text(unet_params, text_params, len(tokens))
        model = lambda x, t, c, **kw: self.unet.apply({"params": unet_params}, x, t, c, **kw)
        denoise = samplers.classifier_free_guidance(model, text, null, cfg)
      if classifier_guide is not None:
        denoise = samplers.classifier_guidance(
          denoise, classifier_guide.log_prob, self.schedule, prediction=self.prediction,
          scale=classifier_guide.scale, max_timestep=classifier_guide.max_timestep,
        )  # fmt: skip
      if sampler == "ddim":
        latents = samplers.ddim_sample(
          denoise, self.schedule, x_T, steps, prediction=self.prediction, eta=eta,
          rng=jax.random.fold_in(key, 1), self_condition=self_condition,
        )  # fmt: skip
      else:
        latents = samplers.dpm_solver_pp_2m_sample(
          denoise, self.schedule, x_T, steps, prediction=self.prediction,
          self_condition=self_condition,
        )  # fmt: skip
    else:
      raise ValueError(f"sampler {sampler!r}: expected 'ddim', 'dpm++' or 'ufogen'")
    images = self.decode_latents(autoencoder_params, latents)
    return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)

  def load_pretrained(self, state: DiffusionState) -> DiffusionState:
    """Puts pretrained CLIP weights (`config.text_encoder.path`) and the VAE in the state."""
    if self._pretrained_text_params is not None:
      state = state.replace(
        text_encoder=self._with_text_params(state.text_encoder, self._pretrained_text_params)
      )
    if self.latent_space.pretrained_params is not None:
      state = state.replace(
        autoencoder=checkpoints.copy_into(self.latent_space.pretrained_params, state.autoencoder)
      )
    return state.replace(
      classifier=latent_classifier.load_guide_params(self.classifier, state.classifier),
      representation_encoder=latent_classifier.load_guide_params(
        self.representation_encoder, state.representation_encoder
      ),
    )

  def initialize_from(self, state: DiffusionState, source) -> DiffusionState:
    """Starts from another diffusion-family checkpoint (e.g. relu finetune from softmax).

    Takes the source's UNet params (its EMA when `config.init_from_ema`) for both params and EMA,
    its frozen parts, and a fresh optimizer state and step.
    """
    unet = source["unet"]
    params = unet["ema_params"] if self.config.get("init_from_ema", True) else unet["params"]
    params = checkpoints.copy_into(params, state.unet.params)
    return state.replace(
      unet=state.unet.replace(params=params, ema_params=params, opt_state=self.tx.init(params)),
      text_encoder=self._with_text_params(
        state.text_encoder, text_encoder_params(source["text_encoder"])
      ),
      autoencoder=checkpoints.copy_into(source["autoencoder"], state.autoencoder),
    )

  def _with_text_params(self, text_encoder, source_params):
    """`text_encoder` (frozen params or a TrainState) holding `source_params` instead."""
    if not isinstance(text_encoder, TrainState):
      return checkpoints.copy_into(source_params, text_encoder)
    params = checkpoints.copy_into(source_params, text_encoder.params)
    return text_encoder.replace(params=params, ema_params=params, opt_state=self.tx.init(params))

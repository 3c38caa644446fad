"""Stage `diffusion` (and `relu_finetune`): text-conditioned latent diffusion training (Sec. 5.1).

CLIP text encoder → frozen image encoder (latents) → noised latents → UNet → ε or v loss,
optionally min-SNR weighted per timestep (and joined by the alignment of the UNet's middle with
a frozen latent classifier's map of the clean latent, REPA), with 10% of captions replaced by the
empty prompt so the same model serves classifier-free guidance. The UNet is optimised, and the
text encoder too when `config.text_encoder.train` (a randomly initialised one has nothing to keep
frozen); the frozen parts live in the state too, so a checkpoint alone rebuilds the whole
text-to-image model (`pipeline.TextToImage.from_checkpoint`).

With `config.latents.cached` the batch brings the frozen encoders' outputs, precomputed once by
`md_jax.cache_latents` ("latents", "text_states"), instead of images and tokens: the step runs
neither the VAE encoder nor CLIP (but for CLIP on the empty prompt, once, where the UNet has no
learned null text: its states replace the dropped captions'). The frozen parts stay in the state
all the same (sampling decodes with them, and a checkpoint still holds the whole model).
"""

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from md_jax.diffusion import schedules
from md_jax.infra import checkpoints
from md_jax.infra.phases import phases_from_config
from md_jax.pipeline.checkpoint_layout import InferenceParams, trained_params
from md_jax.pipeline.text_to_image import TextToImage
from md_jax.training import latent_classifier, optimizers, representation_alignment
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState


class DiffusionState(flax.struct.PyTreeNode):
  unet: TrainState
  text_encoder: Any  # CLIP params when frozen; a TrainState when `config.text_encoder.train`
  autoencoder: Any  # frozen image-encoder params ({} for pixel space)
  # Always {}: the retired classifier loss's params, kept so that runs checkpointed while it
  # existed still resume (a restore matches the state's structure, empty fields included).
  classifier: Any = flax.struct.field(default_factory=dict)
  # The frozen latent classifier of `config.representation_alignment` ({} without one).
  representation_encoder: Any = flax.struct.field(default_factory=dict)

  @property
  def step(self):
    return self.unet.step

  def inference_params(self) -> InferenceParams:
    """What the pipeline samples with: the EMA params of what trains, the frozen parts."""
    return InferenceParams(
      unet=self.unet.ema_params,
      text_encoder=text_encoder_params(self.text_encoder),
      autoencoder=self.autoencoder,
    )


def text_encoder_params(text_encoder, *, ema: bool = True):
  """The params to encode text with from a state's `text_encoder`: the frozen params themselves,
  or (trained jointly) its EMA or raw params."""
  if isinstance(text_encoder, TrainState):
    return text_encoder.ema_params if ema else text_encoder.params
  return text_encoder


class DiffusionStage(Stage):
  starts_from = ("diffusion", "relu_finetune")  # e.g. relu finetuning from a softmax run

  def __init__(self, config, tokenizer=None):
    self.config = config
    if config.stage == "relu_finetune":
      self.needs_init_checkpoint = "the softmax diffusion run to finetune"
    self.pipeline = TextToImage.from_config(config, tokenizer=tokenizer)
    self.unet = self.pipeline.unet
    self.schedule = self.pipeline.schedule
    self.prediction = self.pipeline.prediction
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.lr_schedule = optimizers.learning_rate_schedule(config.optimizer)
    self.train_text_encoder = bool(config.text_encoder.get("train", False))
    self.cached = bool(config.latents.get("cached"))  # batches of cached latents and text states

  @functools.cached_property
  def representation_encoder(self):
    """The frozen latent classifier of `config.representation_alignment` (its `scale` the loss's
    weight), or None. Loaded on first use, which can be inside the traced `init_state`: the
    checkpoint is read, and checked, eagerly all the same."""
    with jax.ensure_compile_time_eval():
      resolutions = [phase.resolution for phase in phases_from_config(self.config)]
      return representation_alignment.load_encoder(
        self.config.get("representation_alignment"),
        self.pipeline,
        what="config.representation_alignment",
        phase_latent_shapes={r: self.pipeline.latent_shape(r) for r in resolutions},
      )

  def aligns_representation(self, x_t) -> bool:
    """Whether representation alignment applies to this batch: only to latents of the encoder's
    size (a progressive run's other phases train on the plain loss), or in every phase with
    `representation_alignment.every_phase` (the encoder's map is convolutional, so it reads a
    smaller phase's latents too, if off the size it was trained on)."""
    encoder = self.representation_encoder
    if encoder is None:
      return False
    every_phase = self.config.representation_alignment.get("every_phase", False)
    return every_phase or x_t.shape[1:] == encoder.latent_shape

  # --- Stage hooks ------------------------------------------------------------------------

  def init_state(self, rng) -> DiffusionState:
    key = jax.random.wrap_key_data(rng)
    # Four keys, of which the fourth was the retired classifier loss's: a run's initial weights
    # stay what they were.
    k_unet, k_text, k_ae, _ = jax.random.split(key, 4)
    # Pretrained CLIP weights and the VAE are put in by `load_pretrained` after this traced init.
    params = self.pipeline.init_params((k_unet, k_text, k_ae), self.config.data.resolution)
    unet_state = TrainState.create(
      params=params.unet, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
    )
    text_params = params.text_encoder
    if self.train_text_encoder:  # its own optimizer state and EMA, the UNet's settings
      text_params = TrainState.create(
        params=text_params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
      )
    return DiffusionState(
      unet=unet_state,
      text_encoder=text_params,
      autoencoder=params.autoencoder,
      representation_encoder=latent_classifier.init_guide_params(self.representation_encoder),
    )

  def loss(self, params, state: DiffusionState, batch):
    """(loss, {auxiliary term: value}) of `batch` for params = (UNet params, text-encoder
    params): what `train_step` differentiates. The draws of t, noise and dropped captions come
    from the state's step rng, so one state and batch always give the same draws."""
    pipeline = self.pipeline
    k_t, k_noise, k_drop = jax.random.split(state.unet.step_rng(), 3)
    tokens = batch["tokens"]
    batch_size = tokens.shape[0]
    drop = jax.random.bernoulli(k_drop, self.config.condition_dropout, (batch_size,))
    swap_null = not self.unet.learned_null_text  # else the UNet swaps in its learned null text
    if swap_null and not self.cached:
      tokens = jnp.where(drop[:, None], pipeline.null_tokens[None], tokens)
    if self.cached:
      x0 = batch["latents"]
    else:
      x0 = pipeline.latent_space.encode(state.autoencoder, batch["image"])
    # Configs saved before `timesteps` existed drew them uniformly.
    t = schedules.sample_timesteps(
      k_t, batch_size, self.schedule.num_steps, self.config.get("timesteps")
    )
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = self.schedule.add_noise(x0, noise, t)
    target = noise if self.prediction == "eps" else self.schedule.v_target(x0, noise, t)
    with_representation = self.aligns_representation(x_t)
    weights = jnp.ones((batch_size,))
    if self.config.get("min_snr_gamma", 0) > 0:
      weights = schedules.min_snr_weight(
        self.schedule.snr(t), self.config.min_snr_gamma, self.prediction
      )

    unet_params, text_params = params
    if self.cached:
      text = batch["text_states"]
      if swap_null:  # the empty prompt encoded once, for every dropped caption
        null = pipeline.encode_text(text_params, pipeline.null_tokens[None])
        text = jnp.where(drop[:, None, None], null.astype(text.dtype), text)
    else:
      text = pipeline.encode_text(text_params, tokens)
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
    squared = jnp.square(pred.astype(jnp.float32) - target)
    per_example = jnp.mean(squared, axis=(1, 2, 3))
    loss = jnp.mean(weights * per_example)
    terms = {}
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

  def text_to_image(self, state: DiffusionState):
    return self.pipeline, state.inference_params()

  def sample_images(self, state: DiffusionState, batch, num: int = 8):
    """Images for the batch's first `num` captions (EMA params, DDIM, CFG), as uint8."""
    if self.cached:
      resolution = batch["latents"].shape[1] * self.pipeline.latent_space.downsample
    else:
      resolution = batch["image"].shape[1]
    return self.pipeline.generate(
      state.inference_params(),
      batch["tokens"][:num],
      seed=jax.random.key(self.config.seed),
      resolution=resolution,
      steps=self.config.sample_steps,
      cfg=self.config.sample_cfg,
    )

  def load_pretrained(self, state: DiffusionState) -> DiffusionState:
    """Puts pretrained CLIP weights (`config.text_encoder.path`), the VAE and the
    representation encoder in the state."""
    text_encoder, autoencoder = self._pretrained_encoders(state.text_encoder, state.autoencoder)
    return state.replace(
      text_encoder=text_encoder,
      autoencoder=autoencoder,
      representation_encoder=latent_classifier.load_guide_params(
        self.representation_encoder, state.representation_encoder
      ),
    )

  def _pretrained_encoders(self, text_encoder, autoencoder):
    if self.config.text_encoder.path:
      from md_jax.models.clip_weights import load_clip_text_encoder

      _, pretrained = load_clip_text_encoder(
        self.config.text_encoder.path, dtype=self.pipeline.text_encoder.dtype
      )
      text_encoder = self._with_text_params(text_encoder, pretrained)
    if self.pipeline.latent_space.pretrained_params is not None:
      autoencoder = checkpoints.copy_into(self.pipeline.latent_space.pretrained_params, autoencoder)
    return text_encoder, autoencoder

  def frozen_encoders(self):
    """(text-encoder params, image-encoder params) on the host, as a fresh run of this config
    holds them: `init_state` at `config.seed`, then `load_pretrained`, then the frozen parts of
    `config.init_checkpoint`. What `md_jax.cache_latents` encodes with, so that a run on cached
    latents sees the numbers an uncached run computes (a random-init text encoder included)."""
    if self.train_text_encoder:
      raise ValueError(
        "config.text_encoder.train=True: a text encoder that trains has no fixed states to cache"
      )
    rng = jax.random.key_data(jax.random.key(self.config.seed))  # the trainer's
    # Only the two frozen parts leave the program: XLA drops the UNet's and optimizer's init.
    init = jax.jit(lambda r: (lambda s: (s.text_encoder, s.autoencoder))(self.init_state(r)))
    text_encoder, autoencoder = jax.device_get(nn.meta.unbox(init(rng)))
    text_encoder, autoencoder = self._pretrained_encoders(text_encoder, autoencoder)
    source = self.config.get("init_checkpoint")
    if source:
      tree, _ = checkpoints.load_state_tree(source)
      text_encoder, autoencoder = self._source_encoders(tree, text_encoder, autoencoder)
    return text_encoder, autoencoder

  def _source_encoders(self, source, text_encoder, autoencoder):
    """The frozen parts of `source` (a restored diffusion-family state tree) in ours."""
    return (
      self._with_text_params(text_encoder, trained_params(source["text_encoder"])),
      checkpoints.copy_into(source["autoencoder"], autoencoder),
    )

  def initialize_from(self, state: DiffusionState, source) -> DiffusionState:
    """Starts from another diffusion-family checkpoint (e.g. relu finetune from softmax).

    Takes the source's UNet params (its EMA when `config.init_from_ema`) for both params and EMA,
    its frozen parts, and a fresh optimizer state and step.
    """
    unet = source["unet"]
    params = unet["ema_params"] if self.config.get("init_from_ema", True) else unet["params"]
    params = checkpoints.copy_into(params, state.unet.params)
    text_encoder, autoencoder = self._source_encoders(source, state.text_encoder, state.autoencoder)
    return state.replace(
      unet=state.unet.replace(params=params, ema_params=params, opt_state=self.tx.init(params)),
      text_encoder=text_encoder,
      autoencoder=autoencoder,
    )

  def _with_text_params(self, text_encoder, source_params):
    """`text_encoder` (frozen params or a TrainState) holding `source_params` instead."""
    if not isinstance(text_encoder, TrainState):
      return checkpoints.copy_into(source_params, text_encoder)
    params = checkpoints.copy_into(source_params, text_encoder.params)
    return text_encoder.replace(params=params, ema_params=params, opt_state=self.tx.init(params))

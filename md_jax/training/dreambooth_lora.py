"""Stage `lora`: DreamBooth-LoRA personalization of a frozen diffusion run (paper Sec. 5.4; Ruiz
et al., 2023; Hu et al., 2021).

A handful of images of a new concept (`data/concept.py`: a kind the `shapes` data never holds,
captioned with a rare token) teach LoRA factors on the base UNet's attention and projection
kernels (`config.lora.targets`, regexes on the '/'-joined param path) the base model's own
diffusion loss: same schedule, prediction, latent space and text encoder, all frozen. With
`config.lora.prior_weight` > 0 the trainer's batches of the base data (`config.data`, the `shapes`
dataset itself) add DreamBooth's prior-preservation term, which keeps what the model drew
before. Only the factors are differentiated and in the optimizer state, and with
`config.lora.train_token` the token's own rows of the text encoder's embedding table (pivotal
tuning: DreamBooth's text part as textual inversion, Gal et al., 2022), in a TrainState of their
own under `token`, initialised to the base's rows: a rare token of a vocabulary the base never
captioned with is random vectors that the factors alone bind poorly (BENCHMARKS.md, 'pivotal
tuning').

The concept set lives in memory, a pure function of `config.lora`; the step draws its concept
batch from the step's rng, so a resumed run sees the same batches. The state keeps the factors'
TrainState under `lora` and the diffusion run's frozen parts beside it; at the last step the
factors (EMA), and the token's rows when trained, are written to `config.lora.export`
(`pipeline/lora_file.save_lora`; any
checkpoint later with `python -m md_jax.tools.export_lora`), a file that applies to any UNet of
the base's layout, the UFOGen one-step generator included.
"""

import re
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from md_jax.config_utils import inherit_from_diffusion
from md_jax.data import concept
from md_jax.data import tokenizer as tokenizer_lib
from md_jax.infra import checkpoints
from md_jax.models import lora as lora_lib
from md_jax.pipeline import lora_run
from md_jax.pipeline.checkpoint_layout import InferenceParams, trained_params
from md_jax.pipeline.text_to_image import TextToImage
from md_jax.training import frozen_base, optimizers
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState


class LoRAState(flax.struct.PyTreeNode):
  lora: TrainState  # the factors, `models/lora.init_lora`'s tree
  unet: Any  # the base UNet's params, frozen
  text_encoder: Any  # frozen (the token's rows train in `token`)
  autoencoder: Any  # frozen
  token: TrainState | None = None  # the token's embedding rows (`config.lora.train_token`)

  @property
  def step(self):
    return self.lora.step


def config_for_base(config, base_config):
  """A lora `config` fitted to a diffusion run's saved config (`base_config`, a ConfigDict or the
  dict `infra.checkpoints.saved_config` reads): its model, text encoder, latent space, schedule,
  prediction and data at its final resolution."""
  if isinstance(base_config, dict):
    base_config = ml_collections.ConfigDict(base_config)
  return inherit_from_diffusion(config, base_config)


def target_selector(patterns):
  """(path, leaf) → whether `models/lora.init_lora` adapts that kernel: a 2-D-or-more `kernel`
  whose '/'-joined path one of `patterns` (regexes) matches."""
  compiled = [re.compile(p) for p in patterns]

  def select(path, leaf) -> bool:
    joined = "/".join(path)
    return lora_lib.is_kernel(path, leaf) and any(p.search(joined) for p in compiled)

  return select


class LoRAStage(Stage):
  starts_from = ("diffusion", "relu_finetune")  # the base model, never a one-step generator
  needs_init_checkpoint = "the diffusion run the LoRA is trained on (its workdir or checkpoint)"

  def __init__(self, config, tokenizer=None):
    self.config = config
    self.lcfg = config.lora
    self.pipeline = TextToImage.from_config(config, tokenizer=tokenizer)
    self.unet = self.pipeline.unet
    self.schedule = self.pipeline.schedule
    self.select = target_selector(tuple(self.lcfg.targets))
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.lr_schedule = optimizers.learning_rate_schedule(config.optimizer)
    # The concept set, in memory: images in [-1, 1] and their token captions' ids.
    data = concept.concept_set(
      self.lcfg.num_images, config.data.resolution, seed=self.lcfg.seed,
      kind=self.lcfg.kind, token=self.lcfg.token,
    )  # fmt: skip
    self.concept = data
    self.concept_images = data.images.astype(np.float32) / 127.5 - 1.0
    self.concept_tokens = tokenizer_lib.tokenize(self.pipeline.tokenizer, list(data.captions))
    self.train_token = bool(self.lcfg.get("train_token", False))
    self.token_ids = np.asarray(lora_run.token_ids(self.pipeline.tokenizer, self.lcfg.token))

  def init_state(self, rng) -> LoRAState:
    key = jax.random.wrap_key_data(rng)
    # The base's shapes only: `initialize_from` fills them in.
    base = self.pipeline.placeholder_params(self.config.data.resolution)
    factors = lora_lib.init_lora(
      base.unet, self.lcfg.rank, jax.random.fold_in(key, 5), select=self.select
    )
    token = None
    if self.train_token:  # the base's rows, set again by `initialize_from`
      rows = nn.meta.unbox(base.text_encoder)["token_embedding"]["embedding"][self.token_ids]
      token = TrainState.create(params=rows, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay)
    return LoRAState(
      lora=TrainState.create(params=factors, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay),
      unet=base.unet,
      text_encoder=base.text_encoder,
      autoencoder=base.autoencoder,
      token=token,
    )

  def with_token_rows(self, text_encoder, rows):
    """The text encoder with the token's rows of its embedding table replaced (None: as it is)."""
    if rows is None:
      return text_encoder
    table = jnp.asarray(text_encoder["token_embedding"]["embedding"]).at[self.token_ids].set(rows)
    return {
      **text_encoder,
      "token_embedding": {**text_encoder["token_embedding"], "embedding": table},
    }

  def merged_unet(self, factors, unet):
    return lora_lib.merge(unet, factors, self.lcfg.alpha, self.lcfg.rank)

  def diffusion_loss(self, unet_params, state: LoRAState, images, tokens, key, dropout: float):
    """The base model's loss (ε or v, its timestep density, min-SNR weights) on one batch."""
    return frozen_base.diffusion_loss(
      self.pipeline, self.config, unet_params, state.text_encoder, state.autoencoder, images,
      tokens, key, dropout,
    )  # fmt: skip

  def concept_batch(self, key):
    """`config.lora.batch_size` concept examples drawn (with replacement) from the step's key."""
    index = jax.random.randint(key, (self.lcfg.batch_size,), 0, len(self.concept_images))
    return jnp.asarray(self.concept_images)[index], jnp.asarray(self.concept_tokens)[index]

  def loss(self, trained, state: LoRAState, batch):
    """Concept loss (its captions never dropped: the token must steer) + prior_weight × the base
    data's loss (captions dropped as in the base's training); draws from the factors' step rng.
    `trained`: (factors, the token's rows or None)."""
    factors, rows = trained
    state = state.replace(text_encoder=self.with_token_rows(state.text_encoder, rows))
    key = state.lora.step_rng()
    unet_params = self.merged_unet(factors, state.unet)
    images, tokens = self.concept_batch(jax.random.fold_in(key, 0))
    concept_loss = self.diffusion_loss(
      unet_params, state, images, tokens, jax.random.fold_in(key, 1), 0.0
    )
    metrics = {"concept_loss": concept_loss}
    total = concept_loss
    if self.lcfg.prior_weight > 0:
      prior_loss = self.diffusion_loss(
        unet_params, state, batch["image"], batch["tokens"], jax.random.fold_in(key, 2),
        self.config.condition_dropout,
      )  # fmt: skip
      metrics["prior_loss"] = prior_loss
      total = total + self.lcfg.prior_weight * prior_loss
    return total, metrics

  def train_step(self, state: LoRAState, batch):
    # Only the factors (and the token's rows) are differentiated: the frozen base is closed over.
    trained = (state.lora.params, None if state.token is None else state.token.params)
    (loss, metrics), (grads, row_grads) = jax.value_and_grad(self.loss, has_aux=True)(
      trained, state, batch
    )
    metrics = {
      **metrics,
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "lr": self.lr_schedule(state.lora.step),
    }
    if state.token is not None:
      metrics["token_grad_norm"] = optax.global_norm(row_grads)
      state = state.replace(token=state.token.apply_gradients(row_grads))
    return state.replace(lora=state.lora.apply_gradients(grads)), metrics

  def text_to_image(self, state: LoRAState):
    rows = None if state.token is None else state.token.ema_params
    return self.pipeline, InferenceParams(
      unet=self.merged_unet(state.lora.ema_params, state.unet),
      text_encoder=self.with_token_rows(state.text_encoder, rows),
      autoencoder=state.autoencoder,
    )

  def sample_images(self, state: LoRAState, batch, num: int = 8):
    """Pairs (concept image, DDIM + CFG sample of its caption with the LoRA) for the first
    `num` concept captions, as uint8."""
    del batch
    pipeline, params = self.text_to_image(state)
    num = min(num, len(self.concept_tokens))
    images = pipeline.generate(
      params, self.concept_tokens[:num], seed=jax.random.key(self.config.seed),
      resolution=self.config.data.resolution, steps=self.config.sample_steps,
      cfg=self.config.sample_cfg,
    )  # fmt: skip
    pairs = np.stack([self.concept.images[:num], np.asarray(jax.device_get(images))], axis=1)
    return pairs.reshape(-1, *pairs.shape[2:])

  def initialize_from(self, state: LoRAState, source) -> LoRAState:
    """The base's UNet (EMA, per `config.init_from_ema`), text encoder and autoencoder, frozen;
    the factors keep their fresh init (B = 0: the merged UNet starts equal to the base)."""
    if not isinstance(source.get("unet"), dict) or "ema_params" not in source["unet"]:
      raise ValueError(
        f"config.init_checkpoint={self.config.init_checkpoint!r} holds no diffusion UNet "
        "('unet/ema_params'): it must name a diffusion run"
      )
    unet = source["unet"]["ema_params" if self.config.get("init_from_ema", True) else "params"]
    state = state.replace(
      unet=checkpoints.copy_into(unet, state.unet),
      text_encoder=checkpoints.copy_into(
        trained_params(source["text_encoder"]), state.text_encoder
      ),
      autoencoder=checkpoints.copy_into(source["autoencoder"], state.autoencoder),
    )
    if state.token is not None:  # the token's rows start as the base's own
      rows = jnp.asarray(state.text_encoder["token_embedding"]["embedding"])[self.token_ids]
      token = state.token.replace(params=rows, ema_params=rows)
      state = state.replace(token=token)
    return state

  def finalize(self, state: LoRAState, batches):
    """At the last step: the EMA factors as a LoRA file at `config.lora.export` (if set; any
    checkpoint of the run exports later with `python -m md_jax.tools.export_lora`)."""
    del batches
    if self.lcfg.get("export") and jax.process_index() == 0:
      self.export(state, self.lcfg.export)
    return state

  def export(self, state: LoRAState, path, *, use_ema: bool = True) -> dict:
    """Writes the factors (EMA by default), and the token's rows when trained, as a LoRA file
    against the frozen base UNet."""
    which = "ema_params" if use_ema else "params"
    token_embedding = None
    if state.token is not None:
      rows = getattr(state.token, which)
      token_embedding = lora_run.token_embedding(self.token_ids, rows, state.text_encoder)
    return lora_run.save_run_lora(
      path, getattr(state.lora, which), state.unet, self.lcfg,
      step=int(jax.device_get(state.step)), init_checkpoint=self.config.get("init_checkpoint", ""),
      token_embedding=token_embedding,
    )  # fmt: skip

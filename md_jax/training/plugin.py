"""Stage `plugin`: a control plugin trained on a frozen diffusion run (paper Sec. 4, 5.4).

The adapter (`models/control_adapter.py`) maps the batch's condition map
(`condition_<config.plugin.condition>`, `data/conditions.py`) to residuals that the frozen base
UNet adds at its encoder levels; the loss is the base's diffusion loss (ε or v, the diffusion
stage's timestep density, min-SNR weights and caption dropout, from the same pieces), and only the
adapter's params receive gradients. Captions are dropped as in the base's training, so the plugin
also steers CFG's unconditional branch.

The state keeps the adapter's TrainState under `adapter` and the diffusion run's frozen parts
beside it (`unet`, `text_encoder`, `autoencoder`), so a plugin checkpoint samples by itself; a
reader takes the adapter alone (`pipeline.control.load_plugin`) and applies it to any UNet of the
base's layout, the UFOGen one-step generator included.
"""

import copy
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from md_jax.config_utils import inherit_from_diffusion
from md_jax.data import conditions
from md_jax.infra import checkpoints
from md_jax.pipeline import control
from md_jax.pipeline.checkpoint_layout import InferenceParams, trained_params
from md_jax.pipeline.text_to_image import TextToImage
from md_jax.training import frozen_base, optimizers
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState


class PluginState(flax.struct.PyTreeNode):
  adapter: TrainState
  unet: Any  # the base UNet's params, frozen
  text_encoder: Any  # frozen
  autoencoder: Any  # frozen

  @property
  def step(self):
    return self.adapter.step

  def base_params(self) -> InferenceParams:
    return InferenceParams(
      unet=self.unet, text_encoder=self.text_encoder, autoencoder=self.autoencoder
    )


def config_for_base(config, base_config):
  """A plugin `config` fitted to a diffusion run's saved config (`base_config`): its model, text
  encoder, latent space, schedule, prediction and data at its final resolution, with this
  plugin's condition map added to the data. `base_config` may be the plain dict
  `infra.checkpoints.saved_config` reads."""
  if isinstance(base_config, dict):
    base_config = ml_collections.ConfigDict(base_config)
  data = copy.deepcopy(config.data.to_dict())
  config = inherit_from_diffusion(config, base_config)
  config.data.conditions = tuple(data.get("conditions", (config.plugin.condition,)))
  return config


class PluginStage(Stage):
  starts_from = ("diffusion", "relu_finetune")  # the base model, never a one-step generator
  needs_init_checkpoint = "the diffusion run the plugin is trained on (its workdir or checkpoint)"

  def __init__(self, config, tokenizer=None):
    self.config = config
    self.kind = config.plugin.condition
    conditions.channels(self.kind)  # a misspelt kind fails here, naming the known ones
    if self.kind not in tuple(config.data.get("conditions", ())):
      raise ValueError(
        f"config.plugin.condition={self.kind!r} is not in config.data.conditions="
        f"{tuple(config.data.get('conditions', ()))}: the pipeline must compute it"
      )
    self.pipeline = TextToImage.from_config(config, tokenizer=tokenizer)
    self.unet = self.pipeline.unet
    self.schedule = self.pipeline.schedule
    self.adapter = control.adapter_from_config(config)
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.lr_schedule = optimizers.learning_rate_schedule(config.optimizer)

  def init_state(self, rng) -> PluginState:
    key = jax.random.wrap_key_data(rng)
    res = self.config.data.resolution
    # The base's shapes only: `initialize_from` fills them in.
    base = self.pipeline.placeholder_params(res)
    condition = jnp.zeros((1, res, res, self.adapter.in_channels))
    params = self.adapter.init(jax.random.fold_in(key, 5), condition)["params"]
    return PluginState(
      adapter=TrainState.create(
        params=params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
      ),
      unet=base.unet,
      text_encoder=base.text_encoder,
      autoencoder=base.autoencoder,
    )

  def condition(self, batch):
    name = f"condition_{self.kind}"
    if name not in batch:
      raise ValueError(f"the batch has no {name!r}: add {self.kind!r} to config.data.conditions")
    return control.condition_input(batch[name])

  def loss(self, adapter_params, state: PluginState, batch):
    """The base model's diffusion loss with the adapter's residuals added; the draws of t, noise
    and dropped captions from the adapter's step rng."""
    features = self.adapter.apply({"params": adapter_params}, self.condition(batch))
    return frozen_base.diffusion_loss(
      self.pipeline, self.config, state.unet, state.text_encoder, state.autoencoder,
      batch["image"], batch["tokens"], state.adapter.step_rng(), self.config.condition_dropout,
      adapter_features=features,
    )  # fmt: skip

  def train_step(self, state: PluginState, batch):
    # Only the adapter is differentiated: the frozen base is closed over, its backward never traced.
    loss, grads = jax.value_and_grad(self.loss)(state.adapter.params, state, batch)
    metrics = {
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "lr": self.lr_schedule(state.adapter.step),
    }
    return state.replace(adapter=state.adapter.apply_gradients(grads)), metrics

  def sample_images(self, state: PluginState, batch, num: int = 8):
    """Pairs (condition, DDIM + CFG sample with the plugin, EMA adapter) for the batch's first
    `num` captions, as uint8."""
    maps = batch[f"condition_{self.kind}"][:num]
    images = self.pipeline.generate(
      state.base_params(), batch["tokens"][:num], seed=jax.random.key(self.config.seed),
      resolution=batch["image"].shape[1], steps=self.config.sample_steps,
      cfg=self.config.sample_cfg, control=(self.adapter, state.adapter.ema_params, maps),
    )  # fmt: skip
    maps = np.asarray(jax.device_get(maps))
    maps = np.repeat(maps, 3, axis=-1) if maps.shape[-1] == 1 else maps
    pairs = np.stack([maps, np.asarray(jax.device_get(images))], axis=1)
    return pairs.reshape(-1, *pairs.shape[2:])

  def initialize_from(self, state: PluginState, source) -> PluginState:
    """The base's UNet (EMA, per `config.init_from_ema`), text encoder and autoencoder, frozen;
    the adapter keeps its fresh (no-op) init."""
    unet = source["unet"]["ema_params" if self.config.get("init_from_ema", True) else "params"]
    return state.replace(
      unet=checkpoints.copy_into(unet, state.unet),
      text_encoder=checkpoints.copy_into(
        trained_params(source["text_encoder"]), state.text_encoder
      ),
      autoencoder=checkpoints.copy_into(source["autoencoder"], state.autoencoder),
    )

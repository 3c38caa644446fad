"""Stage `latent_classifier`: the noise-aware attribute classifier that guides `shapes` sampling.

The UNet on this budget draws a shape's colour, size and place from the caption but not its
outline (BENCHMARKS.md, sessions 10–20): the kind word is used for the shape's area only. A
classifier trained to read the attributes from noised latents x_t gives, through
∇ log p(attributes | x_t), a push toward the outline the caption names at the noise levels
where it is decided (classifier guidance, Dhariwal & Nichol, 2021).

It is trained on the same latents the diffusion model learns (`config.latents`, the VAE's
encoder and latent scale) under the same forward process (`config.schedule`), noised to
t ~ U{0, …, `config.max_timestep`}: above that the attributes are unreadable, and guidance is
applied only below it. `load_guide` checks both against the diffusion run it guides.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels
from md_jax.diffusion import schedules
from md_jax.infra import checkpoints
from md_jax.models import partitioned
from md_jax.models.latent_classifier import NoisyLatentClassifier
from md_jax.pipeline.classifier_guidance import ClassifierGuide, load_guide
from md_jax.pipeline.latent_space import build_latent_space
from md_jax.training import optimizers
from md_jax.training.shapes_classifier import attribute_classifier_step, require_every_label
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState


class LatentClassifierState(flax.struct.PyTreeNode):
  classifier: TrainState
  autoencoder: Any  # the frozen VAE params that encode the training images

  @property
  def step(self):
    return self.classifier.step


def noised_copies(x0, labels: dict, key, schedule, max_timestep: int, draws: int):
  """(x_t, t, noise, labels) for `draws` noisings of each latent in `x0`, each at its own
  t ~ U{0, …, max_timestep}: (draws·B, …), the copies of an image adjacent.

  More than one draw per image halves (for 2) the VAE encoder and input pipeline per classifier
  example, which cost most of a step: the classifier still sees as many (x_t, t) pairs.
  """
  x0 = jnp.repeat(x0, draws, axis=0)
  labels = {k: jnp.repeat(v, draws, axis=0) for k, v in labels.items()}
  k_t, k_noise = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, max_timestep + 1)
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  return schedule.add_noise(x0, noise, t), t, noise, labels


class LatentClassifierStage(Stage):
  def __init__(self, config):
    self.config = config
    require_every_label(config)
    self.latent_space = build_latent_space(config)
    self.schedule = schedules.from_config(config.schedule)
    if not 0 <= config.max_timestep < self.schedule.num_steps:
      raise ValueError(
        f"config.max_timestep={config.max_timestep}: expected 0 … {self.schedule.num_steps - 1}"
      )
    if config.noise_draws < 1:
      raise ValueError(f"config.noise_draws={config.noise_draws}: expected ≥ 1")
    self.model = NoisyLatentClassifier.from_config(config)
    self.tx = optimizers.create_optimizer(config.optimizer)

  def latent_shape(self) -> tuple[int, int, int]:
    return self.latent_space.latent_shape(
      self.config.data.resolution, self.config.model.in_channels
    )

  def init_state(self, rng) -> LatentClassifierState:
    key = jax.random.wrap_key_data(rng)
    k_model, k_ae = jax.random.split(key)
    latents = jnp.zeros((1, *self.latent_shape()))
    params = self.model.init(k_model, latents, jnp.zeros((1,), jnp.int32))["params"]
    ae_params = {}
    if self.latent_space.module is not None:
      res = self.config.data.resolution
      ae_params = self.latent_space.module.init(k_ae, jnp.zeros((1, res, res, 3)))["params"]
    state = TrainState.create(params=params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay)
    return LatentClassifierState(classifier=state, autoencoder=ae_params)

  def load_pretrained(self, state: LatentClassifierState) -> LatentClassifierState:
    if self.latent_space.pretrained_params is None:
      return state
    return state.replace(
      autoencoder=checkpoints.copy_into(self.latent_space.pretrained_params, state.autoencoder)
    )

  def train_step(self, state: LatentClassifierState, batch):
    labels = canonical_labels({key: batch[key] for key in LABEL_NAMES})
    x0 = self.latent_space.encode(state.autoencoder, batch["image"])
    x_t, t, _, labels = noised_copies(
      x0, labels, state.classifier.step_rng(), self.schedule, self.config.max_timestep,
      self.config.noise_draws,
    )  # fmt: skip

    logits_fn = lambda params: self.model.apply({"params": params}, x_t, t)
    classifier, metrics = attribute_classifier_step(state.classifier, labels, logits_fn)
    return state.replace(classifier=classifier), metrics


def training_guide(guide_config, config, pipeline, *, what: str, phase_latent_shapes=None):
  """The frozen guide a training stage of `config` reads, whose data must then carry every label
  (`guide_config`: {checkpoint, weight}; the weight
  becomes the guide's `scale`), or None when the weight is 0. The stage keeps the params in its
  state (`init_guide_params`, then `load_guide_params`), so its checkpoints hold them; training,
  resumed or not, still reads the classifier's run (sampling from the checkpoints does not).
  `phase_latent_shapes`: {resolution: latent shape} of the stage's training phases, of which the
  guide's must be one."""
  if not loss_weight(guide_config, what):
    return None
  require_every_label(config)  # the cheap check first
  return frozen_classifier(
    guide_config, pipeline, what=what, phase_latent_shapes=phase_latent_shapes
  )


def loss_weight(loss_config, what: str) -> float:
  """A frozen-classifier loss's weight (0 without a config), checked."""
  weight = loss_config.get("weight", 0.0) if loss_config else 0.0
  if weight < 0:
    raise ValueError(f"{what}.weight={weight}: expected ≥ 0 (0 turns it off)")
  if weight and not loss_config.get("checkpoint"):
    raise ValueError(f"{what}.weight={weight} needs {what}.checkpoint: a latent_classifier run")
  return weight


def frozen_classifier(loss_config, pipeline, *, what, phase_latent_shapes) -> ClassifierGuide:
  """The `latent_classifier` run of `loss_config.checkpoint` as a guide of scale
  `loss_config.weight`, checked against the pipeline and the stage's phases."""
  guide = load_guide(
    loss_config.checkpoint, pipeline, scale=loss_config.weight, what=f"{what}.checkpoint"
  )
  if phase_latent_shapes and guide.latent_shape not in phase_latent_shapes.values():
    raise ValueError(
      f"{what}: the classifier reads {guide.latent_shape} latents, and no phase of this run has "
      f"them (resolutions {list(phase_latent_shapes)})"
    )
  return guide


def init_guide_params(guide: ClassifierGuide | None):
  """Boxed params of the guide's shape, zeros (`load_guide_params` puts in the trained ones, so a
  random init would only cost its compile), {} without a guide: what `init_state` puts in the
  state."""
  if guide is None:
    return {}
  return partitioned.zeros_of_init(
    lambda: guide.model.init(
      jax.random.key(0), jnp.zeros((1, *guide.latent_shape)), jnp.zeros((1,), jnp.int32)
    )["params"]
  )


def load_guide_params(guide: ClassifierGuide | None, params):
  """The trained guide's params copied into the state's `params` (unchanged without a guide)."""
  if guide is None:
    return params
  return checkpoints.copy_into(guide.params, params)


def batch_guide(guide: ClassifierGuide, params, batch) -> ClassifierGuide:
  """`guide` with the state's `params`, asking for the attributes of `batch`'s captions."""
  labels = canonical_labels({key: batch[key] for key in LABEL_NAMES})
  return guide.replace(params=params).with_labels(labels)

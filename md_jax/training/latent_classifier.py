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
import ml_collections
import numpy as np

from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels
from md_jax.diffusion import schedules
from md_jax.models.latent_classifier import NoisyLatentClassifier
from md_jax.training import checkpoints, optimizers
from md_jax.training.latent_space import build_latent_space, encode_images
from md_jax.training.shapes_classifier import attribute_classifier_step, require_every_label
from md_jax.training.train_state import TrainState


def classifier_from_config(config) -> NoisyLatentClassifier:
  model = config.model
  return NoisyLatentClassifier(
    num_classes=tuple((key, len(names)) for key, names in LABEL_NAMES.items()),
    channels=tuple(model.channels),
    blocks_per_level=model.blocks_per_level,
    time_dim=model.time_dim,
    feature_dim=model.feature_dim,
    num_groups=model.num_groups,
  )


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


class LatentClassifierStage:
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
    self.model = classifier_from_config(config)
    self.tx = optimizers.create_optimizer(config.optimizer)

  def latent_shape(self) -> tuple[int, int, int]:
    side = self.config.data.resolution // self.latent_space.downsample
    return side, side, self.config.model.in_channels

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
    x0 = encode_images(self.latent_space, state.autoencoder, batch["image"])
    x_t, t, _, labels = noised_copies(
      x0, labels, state.classifier.step_rng(), self.schedule, self.config.max_timestep,
      self.config.noise_draws,
    )  # fmt: skip

    logits_fn = lambda params: self.model.apply({"params": params}, x_t, t)
    classifier, metrics = attribute_classifier_step(state.classifier, labels, logits_fn)
    return state.replace(classifier=classifier), metrics


class ClassifierGuide(flax.struct.PyTreeNode):
  """What `DiffusionStage.generate` needs to guide a batch: the classifier, its params, the
  attribute ids each image asks for (canonical order), and the guidance settings."""

  params: Any
  labels: dict  # {label key: (B,) int ids}
  model: NoisyLatentClassifier = flax.struct.field(pytree_node=False)
  keys: tuple[str, ...] = flax.struct.field(pytree_node=False)  # the attributes guided
  weights: tuple[float, ...] = flax.struct.field(pytree_node=False)  # each key's, in `log_prob`
  scale: float = flax.struct.field(pytree_node=False)
  max_timestep: int = flax.struct.field(pytree_node=False)
  # The latent map it was trained on: its last map is flattened, so it reads no other size.
  latent_shape: tuple[int, int, int] = flax.struct.field(pytree_node=False)

  def with_labels(self, labels) -> "ClassifierGuide":
    """This guide for a batch asking for `labels` ({label key: (B,) canonical ids})."""
    return self.replace(labels={key: jnp.asarray(labels[key]) for key in self.keys})

  def log_prob(self, x_t, t):
    """Σ weight · log p(the asked attribute | x_t) over `keys` and their `weights`, (B,), the
    attributes independent (all weights 1: the log-probability of them all)."""
    logits = self.model.apply({"params": self.params}, x_t, t)
    picked = [
      weight
      * jnp.take_along_axis(jax.nn.log_softmax(logits[key]), self.labels[key][:, None], -1)[:, 0]
      for key, weight in zip(self.keys, self.weights, strict=True)
    ]
    return sum(picked)


def load_guide(
  workdir: str | None, diffusion_stage, *, scale: float, keys=None, weights=None,
  what: str = "--latent_classifier",
) -> ClassifierGuide | None:  # fmt: skip
  """A `ClassifierGuide` (no labels yet: `with_labels`) from a `latent_classifier` run's EMA
  params, checked against the diffusion stage it will guide: the same latents (scale) and the
  same forward process. `keys` default to every attribute, `weights` (one ≥ 0 per key) to 1
  each. None when neither a run nor a scale is given (no guidance); one without the other is an
  error."""
  if bool(workdir) != bool(scale):
    raise ValueError(
      f"classifier guidance needs both {what} ({workdir!r}) and a nonzero scale ({scale})"
    )
  if not workdir:
    return None
  # Every attribute by default: guiding only the kinds raised them less and left the colours as
  # they were (BENCHMARKS.md, session 21).
  keys = tuple(keys or LABEL_NAMES)
  unknown = sorted(set(keys) - set(LABEL_NAMES))
  if unknown:
    raise ValueError(f"classifier keys {unknown} are not label keys (known: {list(LABEL_NAMES)})")
  weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(keys)
  if len(weights) != len(keys) or min(weights) < 0:
    raise ValueError(
      f"classifier key weights {list(weights)}: expected one ≥ 0 for each of the keys {list(keys)}"
    )
  config = ml_collections.ConfigDict(checkpoints.saved_config(workdir, what))
  if config.get("stage") != "latent_classifier":
    raise ValueError(f"{what}={workdir!r} is a {config.get('stage')!r} run, not latent_classifier")
  tree, _ = checkpoints.load_state_tree(workdir, what)
  latent_space = build_latent_space(config)
  latent_scale = latent_space.scale
  if not np.isclose(latent_scale, diffusion_stage.latent_space.scale, rtol=1e-6):
    raise ValueError(
      f"{what}={workdir!r} was trained on latents scaled by {latent_scale:.6g}, the diffusion "
      f"model's are scaled by {diffusion_stage.latent_space.scale:.6g}: not the same latent space"
    )
  schedule = schedules.from_config(config.schedule)
  if not np.allclose(schedule.alphas_cumprod, diffusion_stage.schedule.alphas_cumprod):
    raise ValueError(f"{what}={workdir!r} uses another noise schedule than the diffusion model")
  params = jax.device_put(tree["classifier"]["ema_params"])
  side = config.data.resolution // latent_space.downsample
  return ClassifierGuide(
    params, {}, classifier_from_config(config), keys, weights, float(scale),
    int(config.max_timestep),
    (side, side, config.model.in_channels),
  )  # fmt: skip


def training_guide(guide_config, diffusion_stage, *, what: str, phase_latent_shapes=None):
  """The frozen guide a training stage reads (`guide_config`: {checkpoint, weight[, keys,
  key_weights]}; the weight becomes the guide's `scale`, `keys` the attributes scored, default
  every one, `key_weights` each one's share of the weight, default 1 each; a `min_read_timestep`
  is checked against the classifier's last t), or None
  when the weight is 0. The stage keeps the params in its state (`init_guide_params`, then
  `load_guide_params`), so its checkpoints hold them; training, resumed or not, still reads the
  classifier's run (sampling from the checkpoints does not).
  `phase_latent_shapes`: {resolution: latent shape} of the stage's training phases, of which the
  guide's must be one."""
  if not loss_weight(guide_config, what):
    return None
  require_every_label(diffusion_stage.config)  # the cheap check first
  guide = frozen_classifier(
    guide_config,
    diffusion_stage,
    what=what,
    phase_latent_shapes=phase_latent_shapes,
    keys=guide_config.get("keys"),
    weights=guide_config.get("key_weights"),
  )
  floor = guide_config.get("min_read_timestep", 0)  # where a loss reads x̂_0 (its own setting)
  if not 0 <= floor <= guide.max_timestep:
    raise ValueError(
      f"{what}.min_read_timestep={floor}: expected 0 … {guide.max_timestep}, "
      "the t the classifier was trained to"
    )
  return guide


def loss_weight(loss_config, what: str) -> float:
  """A frozen-classifier loss's weight (0 without a config), checked."""
  weight = loss_config.get("weight", 0.0) if loss_config else 0.0
  if weight < 0:
    raise ValueError(f"{what}.weight={weight}: expected ≥ 0 (0 turns it off)")
  if weight and not loss_config.get("checkpoint"):
    raise ValueError(f"{what}.weight={weight} needs {what}.checkpoint: a latent_classifier run")
  return weight


def frozen_classifier(
  loss_config, diffusion_stage, *, what, phase_latent_shapes, keys=None, weights=None
) -> ClassifierGuide:
  """The `latent_classifier` run of `loss_config.checkpoint` as a guide of scale
  `loss_config.weight`, checked against the diffusion stage and its phases (`training_guide`)."""
  guide = load_guide(
    loss_config.checkpoint,
    diffusion_stage,
    scale=loss_config.weight,
    keys=keys,
    weights=weights,
    what=f"{what}.checkpoint",
  )
  if phase_latent_shapes and guide.latent_shape not in phase_latent_shapes.values():
    raise ValueError(
      f"{what}: the classifier reads {guide.latent_shape} latents, and no phase of this run has "
      f"them (resolutions {list(phase_latent_shapes)})"
    )
  return guide


def init_guide_params(guide: ClassifierGuide | None, key):
  """Boxed params of the guide's shape (random; `load_guide_params` puts in the trained ones),
  {} without a guide: what `init_state` puts in the state."""
  if guide is None:
    return {}
  latents = jnp.zeros((1, *guide.latent_shape))
  return guide.model.init(key, latents, jnp.zeros((1,), jnp.int32))["params"]


def load_guide_params(guide: ClassifierGuide | None, params):
  """The trained guide's params copied into the state's `params` (unchanged without a guide)."""
  if guide is None:
    return params
  return checkpoints.copy_into(guide.params, params)


def batch_guide(guide: ClassifierGuide, params, batch) -> ClassifierGuide:
  """`guide` with the state's `params`, asking for the attributes of `batch`'s captions."""
  labels = canonical_labels({key: batch[key] for key in LABEL_NAMES})
  return guide.replace(params=params).with_labels(labels)


def denoised_cross_entropy(
  guide: ClassifierGuide, schedule, x0_hat, t, captioned, key, min_read_timestep: int = 0
):
  """The guide's cross-entropy of the asked attributes, read from `x0_hat` noised afresh to
  t clipped to [min_read_timestep, its last t], averaged over the `captioned` examples (B,) bool:
  a training loss on a model's x̂_0. The fresh noise keeps the model from satisfying the
  classifier with patterns a noised image would not keep; a floor on it keeps the gradient to the
  smooth one of a noisy read, where a nearly clean read's can be an adversarial pattern."""
  t_read = jnp.clip(t, min_read_timestep, guide.max_timestep)
  x_read = schedule.add_noise(x0_hat, jax.random.normal(key, x0_hat.shape), t_read)
  cross_entropy = -guide.log_prob(x_read, t_read)
  return jnp.sum(jnp.where(captioned, cross_entropy, 0.0)) / jnp.maximum(jnp.sum(captioned), 1)

"""Classifier guidance by a noise-aware latent classifier (Dhariwal & Nichol, 2021).

A `latent_classifier` run reads every caption attribute of `shapes` (kinds, colours, sizes,
places, background) from noised latents x_t; `ClassifierGuide.log_prob` is the log-probability of
the attributes each image asks for, whose gradient `samplers.classifier_guidance` adds to the
sampler's noise estimate. `load_guide` checks the run against the pipeline it guides: the same
latent space (scale) and forward process.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from md_jax.data.shapes_scene import LABEL_NAMES
from md_jax.diffusion import schedules
from md_jax.infra import checkpoints
from md_jax.models.latent_classifier import NoisyLatentClassifier
from md_jax.pipeline.latent_space import build_latent_space


class ClassifierGuide(flax.struct.PyTreeNode):
  """What a sampler needs to guide a batch: the classifier, its params, the attribute ids each
  image asks for (canonical order), and the guidance settings."""

  params: Any
  labels: dict  # {label key: (B,) int ids}
  model: NoisyLatentClassifier = flax.struct.field(pytree_node=False)
  scale: float = flax.struct.field(pytree_node=False)
  max_timestep: int = flax.struct.field(pytree_node=False)
  # The latent map it was trained on: its last map is flattened, so it reads no other size.
  latent_shape: tuple[int, int, int] = flax.struct.field(pytree_node=False)

  def with_labels(self, labels) -> "ClassifierGuide":
    """This guide for a batch asking for `labels` ({label key: (B,) canonical ids})."""
    return self.replace(labels={key: jnp.asarray(labels[key]) for key in LABEL_NAMES})

  def log_prob(self, x_t, t):
    """log p(every asked attribute | x_t), (B,), the attributes independent."""
    logits = self.model.apply({"params": self.params}, x_t, t)
    picked = [
      jnp.take_along_axis(jax.nn.log_softmax(logits[key]), self.labels[key][:, None], -1)[:, 0]
      for key in LABEL_NAMES
    ]
    return sum(picked)


def load_guide(
  workdir: str | None, pipeline, *, scale: float, what: str = "--latent_classifier"
) -> ClassifierGuide | None:
  """A `ClassifierGuide` (no labels yet: `with_labels`) from a `latent_classifier` run's EMA
  params, checked against the `TextToImage` pipeline it will guide: the same latents (scale) and
  the same forward process. None when neither a run nor a scale is given (no guidance); one
  without the other is an error."""
  if bool(workdir) != bool(scale):
    raise ValueError(
      f"classifier guidance needs both {what} ({workdir!r}) and a nonzero scale ({scale})"
    )
  if not workdir:
    return None
  config, tree, _ = checkpoints.open_checkpoint(workdir, what, ("latent_classifier",))
  latent_space = build_latent_space(config)
  if not np.isclose(latent_space.scale, pipeline.latent_space.scale, rtol=1e-6):
    raise ValueError(
      f"{what}={workdir!r} was trained on latents scaled by {latent_space.scale:.6g}, the "
      f"diffusion model's are scaled by {pipeline.latent_space.scale:.6g}: not the same latent "
      "space"
    )
  schedule = schedules.from_config(config.schedule)
  if not np.allclose(schedule.alphas_cumprod, pipeline.schedule.alphas_cumprod):
    raise ValueError(f"{what}={workdir!r} uses another noise schedule than the diffusion model")
  return ClassifierGuide(
    params=jax.device_put(tree["classifier"]["ema_params"]),
    labels={},
    model=NoisyLatentClassifier.from_config(config),
    scale=float(scale),
    max_timestep=int(config.max_timestep),
    latent_shape=latent_space.latent_shape(config.data.resolution, config.model.in_channels),
  )

"""What a training stage provides to the shared trainer (`training/trainer.py`).

A stage subclasses `Stage`: it must define `init_state` and `train_step`, pure functions the
trainer shards and jits, and overrides whichever hooks it needs; each hook's default does
nothing, except `initialize_from`, which a stage that cannot start from another run's
checkpoint refuses by name.
"""

from typing import Any

import jax


class Stage:
  # The `config.stage`s of the runs whose checkpoints `initialize_from` takes
  # (`config.init_checkpoint`); none: this stage always starts from its own init.
  starts_from: tuple[str, ...] = ()
  # What `config.init_checkpoint` must name when this stage cannot start without one, else None.
  needs_init_checkpoint: str | None = None
  # Each phase's last checkpoint is kept beside the newest `max_checkpoints_to_keep` (e.g. every
  # distillation round's student).
  keeps_phase_checkpoints: bool = False

  def init_state(self, rng: jax.Array) -> Any:
    """The initial state pytree (may hold `nn.LogicallyPartitioned` boxes); has `.step`."""
    raise NotImplementedError

  def train_step(self, state, batch) -> tuple[Any, dict]:
    """One optimisation step: (state, batch) → (state, scalar metrics incl. "loss")."""
    raise NotImplementedError

  def load_pretrained(self, state):
    """After a fresh init: the pretrained frozen parts (e.g. CLIP weights, a VAE)."""
    return state

  def initialize_from(self, state, source):
    """`config.init_checkpoint`: `state` started from another run's restored state tree."""
    del state, source
    raise ValueError(
      f"config.init_checkpoint is set, but a {type(self).__name__} starts from no other run"
    )

  def begin_phase(self, state, phase_index: int):
    """Before phase `phase_index`'s first step, also when a run resumes in it: the state to run
    it with. Return `state` itself to change nothing (the default); a new state is placed on the
    run's shardings. Must be idempotent: a resume mid-phase calls it again."""
    del phase_index
    return state

  def text_to_image(self, state):
    """(pipeline, `InferenceParams`) that `state` generates with (EMA params), for `config.evals`;
    None for a stage that generates no images."""
    del state
    return None

  def sample_images(self, state, batch):
    """uint8 images (N, H, W, 3) for the trainer's sample grid (`config.sample_every`), or None."""
    del state, batch
    return None

  def finalize(self, state, batches):
    """Once, when the run reaches its last step, before the final checkpoint: e.g. the VAE's
    latent std, measured on `batches` (the training split in order, unaugmented, read lazily)."""
    del batches
    return state

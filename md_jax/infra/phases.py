"""The phase schedule of a run: progressive training (e.g. 256 px then 512 px, paper Sec. 5.1).

Each phase has its resolution, global batch size and the cumulative step it ends at; the trainer
switches pipeline, batch size and compiled step between them, and readers of a checkpoint take
the last phase's resolution as the model's.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Phase:
  resolution: int
  global_batch_size: int
  end_step: int  # cumulative: this phase runs while step < end_step


def phases_from_config(config) -> list[Phase]:
  """`config.progressive` (resolutions, batch_sizes, steps) or one phase from the data config."""
  prog = config.get("progressive")
  if prog and prog.get("resolutions"):
    sizes = {len(prog.resolutions), len(prog.batch_sizes), len(prog.steps)}
    if len(sizes) != 1:
      raise ValueError(
        "config.progressive: resolutions, batch_sizes and steps must have the same length"
      )
    ends = np.cumsum(prog.steps).tolist()
    return [Phase(r, b, e) for r, b, e in zip(prog.resolutions, prog.batch_sizes, ends)]
  return [Phase(config.data.resolution, config.global_batch_size, config.num_train_steps)]


def final_step(config) -> int:
  """The global step a run of `config` stops at: its phases' end, capped by `total_steps`."""
  last_step = phases_from_config(config)[-1].end_step
  if config.get("total_steps", -1) > 0:
    last_step = min(last_step, config.total_steps)
  return last_step


def final_resolution(config) -> int:
  """The resolution a run's model ends at (its last phase's): what readers sample at."""
  return phases_from_config(config)[-1].resolution

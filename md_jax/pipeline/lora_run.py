"""A `lora` run's factors as a LoRA file: what the stage writes at its last step
(`config.lora.export`) and `python -m md_jax.tools.export_lora` writes from any of its
checkpoints, one function so both files carry the same manifest.

A `lora` checkpoint keeps the factors' TrainState under `lora` and the frozen base UNet they were
trained on under `unet` (`training/dreambooth_lora.py`).
"""

import flax.linen as nn
import jax
import numpy as np

from md_jax.infra import checkpoints
from md_jax.pipeline import lora_file


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(nn.meta.unbox(tree)))


def save_run_lora(path, factors, base_unet, lora_config, *, step: int, init_checkpoint: str):
  """Writes `factors` (trained on `base_unet`) with `lora_config`'s rank and alpha, and the
  concept's token and kind, the step and the base run in the manifest's info."""
  info = {
    "token": str(lora_config.token),
    "kind": str(lora_config.kind),
    "step": int(step),
    "init_checkpoint": str(init_checkpoint),
  }
  return lora_file.save_lora(
    path, _host(factors), rank=int(lora_config.rank), alpha=float(lora_config.alpha),
    base_params=_host(base_unet), info=info,
  )  # fmt: skip


def export_checkpoint(run: str, out, *, use_ema: bool = True) -> dict:
  """The LoRA file of a `lora` run's checkpoint (a workdir: its latest) at `out`; its manifest."""
  config, tree, step = checkpoints.open_checkpoint(run, "--workdir", ("lora",))
  factors = tree["lora"]["ema_params" if use_ema else "params"]
  return save_run_lora(
    out, factors, tree["unet"], config.lora, step=step,
    init_checkpoint=config.get("init_checkpoint", ""),
  )  # fmt: skip

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


def token_ids(tokenizer, token: str) -> list[int]:
  """The ids a caption's `token` becomes (start and end markers left out): the rows of the text
  encoder's table a pivotal-tuned LoRA trains."""
  ids = tokenizer(str(token).strip())["input_ids"][1:-1]
  if not ids:
    raise ValueError(f"config.lora.token={token!r} tokenizes to nothing")
  return [int(i) for i in ids]


def token_embedding(ids, rows, text_encoder) -> dict:
  """`save_lora`'s `token_embedding`: trained `rows` of `text_encoder`'s token table at `ids`."""
  table = text_encoder["token_embedding"]["embedding"]
  return {"ids": [int(i) for i in ids], "rows": rows, "table_shape": list(np.shape(table))}


def save_run_lora(path, factors, base_unet, lora_config, *, step: int, init_checkpoint: str,
                  token_embedding: dict | None = None):  # fmt: skip
  """Writes `factors` (trained on `base_unet`) with `lora_config`'s rank and alpha, and the
  concept's token and kind, the step and the base run in the manifest's info; `token_embedding`:
  the token's trained rows (`lora_file.save_lora`), when the run trained them."""
  info = {
    "token": str(lora_config.token),
    "kind": str(lora_config.kind),
    "step": int(step),
    "init_checkpoint": str(init_checkpoint),
  }
  return lora_file.save_lora(
    path, _host(factors), rank=int(lora_config.rank), alpha=float(lora_config.alpha),
    base_params=_host(base_unet), info=info, token_embedding=token_embedding,
  )  # fmt: skip


def export_checkpoint(run: str, out, *, use_ema: bool = True) -> dict:
  """The LoRA file of a `lora` run's checkpoint (a workdir: its latest) at `out`; its manifest."""
  config, tree, step = checkpoints.open_checkpoint(run, "--workdir", ("lora",))
  which = "ema_params" if use_ema else "params"
  trained_rows = None
  if tree.get("token"):  # the run trained its token's rows too (`config.lora.train_token`)
    from md_jax.data import tokenizer as tokenizer_lib

    tokenizer = tokenizer_lib.load_tokenizer(*tokenizer_lib.tokenizer_dir_of(config))
    ids = token_ids(tokenizer, config.lora.token)
    trained_rows = token_embedding(ids, tree["token"][which], tree["text_encoder"])
  return save_run_lora(
    out, tree["lora"][which], tree["unet"], config.lora, step=step,
    init_checkpoint=config.get("init_checkpoint", ""), token_embedding=trained_rows,
  )  # fmt: skip

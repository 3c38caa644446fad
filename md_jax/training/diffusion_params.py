"""The diffusion family's text encoder and inference params (`training/diffusion.py`, UFOGen,
sampling, export, evaluation).

`build_text_encoder` makes the CLIP text encoder a config asks for (pretrained or random-init).
`text_encoder_params` picks the text encoder's params (to train or to sample with) out of a live
`DiffusionState` or a restored checkpoint tree, whichever form it took there (frozen params, or a
jointly trained TrainState); `inference_params` picks all three parts' params to sample with out
of a restored tree, however the UNet was trained (LoRA or not).
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from md_jax.data import tokenizer as tokenizer_lib
from md_jax.models.text_encoder import CLIPTextEncoder
from md_jax.training.train_state import TrainState


def text_encoder_params(text_encoder, *, ema: bool = True):
  """The params to encode text with, from a state's or a restored tree's `text_encoder` entry:
  the frozen params themselves, or (trained jointly) its EMA or raw params."""
  if isinstance(text_encoder, TrainState):
    return text_encoder.ema_params if ema else text_encoder.params
  if isinstance(text_encoder, Mapping) and "ema_params" in text_encoder:
    return text_encoder["ema_params" if ema else "params"]
  return text_encoder


def inference_params(tree, config) -> tuple[Any, Any, Any]:
  """(UNet EMA, text encoder, autoencoder) params from a restored diffusion-family tree and its
  config (a UFOGen LoRA run's UNet is its LoRA factors merged into the frozen base)."""
  unet = tree["unet"]["ema_params"]
  if config.get("ufogen") and config.ufogen.lora.rank > 0:
    from md_jax.models import lora

    unet = lora.merge(
      tree["frozen"]["unet"], unet, config.ufogen.lora.alpha, config.ufogen.lora.rank
    )
  return unet, text_encoder_params(tree["text_encoder"]), tree["autoencoder"]


def build_text_encoder(config, tokenizer) -> tuple[CLIPTextEncoder, Any]:
  """(module, params or None): pretrained from `config.text_encoder.path`, else random-init."""
  te = config.text_encoder
  dtype = jnp.dtype(te.get("dtype", "float32"))
  if te.path:
    from md_jax.models.clip_weights import load_clip_text_encoder

    return load_clip_text_encoder(te.path, dtype=dtype)
  hf_config = {
    "vocab_size": len(tokenizer),
    "hidden_size": te.hidden_size,
    "intermediate_size": te.intermediate_size,
    "num_hidden_layers": te.num_layers,
    "num_attention_heads": te.num_heads,
    "max_position_embeddings": tokenizer_lib.CONTEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "eos_token_id": tokenizer.eos_token_id,
  }
  return CLIPTextEncoder.from_hf_config(hf_config, dtype=dtype), None

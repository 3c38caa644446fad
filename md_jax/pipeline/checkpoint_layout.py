"""Where a diffusion-family checkpoint keeps each part of the text-to-image model.

The training stages that write them (`diffusion`, `relu_finetune`, `ufogen`, `step_distill`) keep
the sampled UNet as a TrainState under `unet` (UFOGen's generator G too, its discriminator beside
it; a distilled student too, its teacher beside it), the
text encoder under `text_encoder` (its params, or a TrainState when trained jointly) and the
frozen image autoencoder under `autoencoder`; a LoRA run keeps the factors as the TrainState and
the base UNet they apply to under `frozen/unet`. Readers take parts only through
`inference_params`, so a checkpoint missing one fails here, naming it.
"""

import dataclasses
from typing import Any

import flax.struct

from md_jax.infra.checkpoints import CheckpointError

DIFFUSION_STAGES = ("diffusion", "relu_finetune", "ufogen", "step_distill")


@dataclasses.dataclass(frozen=True)
class Part:
  path: tuple[str, ...]  # keys from the state tree's root
  what: str  # what it holds, for errors


UNET = Part(("unet", "ema_params"), "the UNet's EMA params (UFOGen: its generator's)")
TEXT_ENCODER = Part(("text_encoder",), "the text encoder's params")
AUTOENCODER = Part(("autoencoder",), "the frozen image autoencoder's params")
LORA_BASE = Part(("frozen", "unet"), "the frozen UNet its LoRA factors apply to")


class InferenceParams(flax.struct.PyTreeNode):
  """The params a text-to-image pipeline samples with."""

  unet: Any
  text_encoder: Any
  autoencoder: Any


def part(tree, part: Part, where: str):
  """The subtree `part` of a restored state tree; a missing one is one error naming it."""
  node = tree
  for depth, key in enumerate(part.path):
    if not isinstance(node, dict) or key not in node:
      found = "/".join(part.path[: depth + 1])
      raise CheckpointError(f"checkpoint {where} has no {found!r}: {part.what}")
    node = node[key]
  return node


def trained_params(node):
  """A part's params to sample with: the EMA of a TrainState saved there, else the node itself
  (a frozen part's params)."""
  return node["ema_params"] if isinstance(node, dict) and "ema_params" in node else node


def inference_params(tree, config, where: str) -> InferenceParams:
  """The params to sample with from a restored diffusion-family tree (`DIFFUSION_STAGES`) and its
  config: EMA UNet (a LoRA run's factors merged into its base), text encoder, autoencoder."""
  unet = part(tree, UNET, where)
  lora_config = config.get("ufogen", {}).get("lora", {})
  if lora_config.get("rank", 0) > 0:
    from md_jax.models import lora

    base = part(tree, LORA_BASE, where)
    unet = lora.merge(base, unet, lora_config.alpha, lora_config.rank)
  return InferenceParams(
    unet=unet,
    text_encoder=trained_params(part(tree, TEXT_ENCODER, where)),
    autoencoder=part(tree, AUTOENCODER, where),
  )

"""What an app attaches to the exported model: LoRA weights merged, a control plugin as an input.

    source = programs.source_from_checkpoint("workdirs/main/ufogen")
    source = attachments.with_loras(source, [("concept.safetensors", 1.0)])
    source = attachments.with_plugin(source, "workdirs/plugin")   # adds `one_step_control`

A LoRA is merged into the UNet's weights before export (W0 + s·(α/r)·A·B, `pipeline/lora_file`):
the artifact is an ordinary UNet of the same size and speed, as a phone wants it. A plugin stays
a separate network inside the program: `one_step_control` takes the condition map as a third
input, float32 in [0, 1] (a canny map's 0/255 divided by 255), and adds the adapter's residuals
to its one UNet call, as `TextToImage.generate(control=...)` does. Both are recorded in the
manifest's `source`.
"""

import dataclasses

import numpy as np

from md_jax.export.programs import _float32


@dataclasses.dataclass(frozen=True)
class Control:
  """A plugin for the `one_step_control` program: the adapter, its float32 params, the kind of
  condition map it reads (`data/conditions.py`)."""

  adapter: object
  params: object
  condition: str

  @property
  def channels(self) -> int:
    return self.adapter.in_channels


def with_loras(source, loras):
  """`source` with every (LoRA file, scale) of `loras` merged into its UNet (and a file's token
  rows set in its text encoder); a LoRA made for another UNet layout is one error naming the file
  (`lora_file.apply_to`)."""
  from md_jax.pipeline import lora_file

  loras = list(loras)
  if not loras:
    return source
  if source.pipeline is None:
    raise ValueError(f"--lora: a {source.description['stage']!r} checkpoint has no UNet")
  loaded = [(lora_file.load_lora(path), scale) for path, scale in loras]
  applied = lora_file.apply_to(source.params, loaded)
  described = [lora_file.describe(manifest, scale) for (_, manifest), scale in loaded]
  return dataclasses.replace(
    source,
    params=applied.replace(
      unet=_float32(applied.unet), text_encoder=_float32(applied.text_encoder)
    ),
    description={**source.description, "loras": described},
  )


def with_plugin(source, plugin: str, what: str = "--plugin"):
  """`source` with the control plugin run `plugin`, whose one-step program takes the condition
  map. A plugin made for another UNet layout is one error naming it."""
  import jax

  from md_jax.data.tokenizer import CONTEXT_LENGTH
  from md_jax.pipeline import control

  if source.pipeline is None:
    raise ValueError(f"{what}: a {source.description['stage']!r} checkpoint has no UNet")
  adapter, params, config = control.load_plugin(plugin, what)
  params = _float32(params)
  # The adapter's residuals must fit this UNet's levels: checked on shapes, nothing computed.
  h, w, c = source.latent_shape(source.resolution)
  r = source.resolution
  condition = jax.ShapeDtypeStruct((1, r, r, adapter.in_channels), np.float32)
  features = jax.eval_shape(lambda p, x: adapter.apply({"params": p}, x), params, condition)
  unet = source.pipeline.unet
  try:
    jax.eval_shape(
      lambda u, f: unet.apply(
        {"params": u}, np.zeros((1, h, w, c), np.float32), np.zeros((1,), np.int32),
        np.zeros((1, CONTEXT_LENGTH, unet.text_dim), np.float32), adapter_features=f,
      ),
      source.params.unet, features,
    )  # fmt: skip
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{what}={plugin!r}: its adapter does not fit this UNet ({str(e).splitlines()[0]})"
    ) from None
  kind = config.plugin.condition
  return dataclasses.replace(
    source,
    control=Control(adapter, params, kind),
    description={**source.description, "plugin": {"run": str(plugin), "condition": kind}},
  )

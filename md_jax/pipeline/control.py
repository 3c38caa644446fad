"""Control plugins at inference: a plugin run's adapter, and its residuals for `generate`.

    adapter, adapter_params, plugin_config = load_plugin("workdirs/plugin")
    images = pipeline.generate(params, prompts, control=(adapter, adapter_params, canny_maps))

The residuals depend on the condition only, so `adapter_features` computes them once per image and
every sampler (DDIM, DPM-Solver++, the one-step UFOGen generator) adds them at each UNet call.
A plugin trained against the diffusion run serves any UNet of its layout: the UFOGen generator
finetuned from that run included (paper Sec. 4, 5.4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from md_jax.data import conditions
from md_jax.infra import checkpoints
from md_jax.models.control_adapter import ControlAdapter
from md_jax.models.unet import UNet

PLUGIN_STAGES = ("plugin",)


def adapter_from_config(config) -> ControlAdapter:
  """The adapter a `plugin` config describes, fitted to `config.model`'s UNet."""
  plugin = config.plugin
  return ControlAdapter.for_unet(
    UNet.from_config(config.model),
    downsample=config.latents.downsample,
    in_channels=conditions.channels(plugin.condition),
    width=plugin.width,
    blocks_per_level=plugin.blocks_per_level,
  )


def load_plugin(path: str, what: str = "--plugin"):
  """(adapter module, its EMA params, the plugin run's config) from a `plugin` run's checkpoint
  (workdir, `checkpoints/` or one step's directory)."""
  config, tree, _ = checkpoints.open_checkpoint(path, what, PLUGIN_STAGES)
  if "adapter" not in tree or "ema_params" not in tree["adapter"]:
    raise checkpoints.CheckpointError(f"{what}={path!r} holds no 'adapter/ema_params'")
  return adapter_from_config(config), tree["adapter"]["ema_params"], config


def condition_input(images) -> jax.Array:
  """uint8 condition maps (0..255) → float32 in [−1, 1], what the adapter reads; float maps are
  taken as already scaled."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _features(adapter: ControlAdapter, params, condition):
  return adapter.apply({"params": params}, condition_input(condition))


def adapter_features(control, num_images: int, resolution: int):
  """The UNet residuals of `control` = (adapter, params, condition maps (N, H, W, C)) for
  `num_images` images at `resolution`; a condition of another shape is one error naming both."""
  adapter, params, images = control
  shape = tuple(np.shape(images))
  wanted = (num_images, resolution, resolution, adapter.in_channels)
  if shape != wanted:
    raise ValueError(
      f"control condition images are {shape}; this call needs {wanted} "
      "(one map per prompt, at the sampling resolution, the plugin's channels)"
    )
  return _features(adapter, params, images)


def condition_from_image(path, kind: str, resolution: int, what: str = "--control_image"):
  """The `kind` condition map (uint8 (resolution, resolution, channels)) of an image file, made
  as the input pipeline makes a training example's: `data/pipeline.Preprocess` (decode to RGB,
  bicubic resize of the shorter side, centre crop) and then `data/conditions.compute`."""
  from etils import epath

  from md_jax.data.pipeline import Preprocess, Undecodable

  conditions.channels(kind)
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError as e:
    raise ValueError(f"{what}={str(path)!r} does not exist") from e
  except IsADirectoryError as e:
    raise ValueError(f"{what}={str(path)!r} is a directory, not an image file") from e
  example = {"image": data, "caption": "control"}
  out = Preprocess(resolution=resolution, conditions=(kind,))(example, None)
  if isinstance(out, Undecodable):
    raise ValueError(f"{what}={str(path)!r}: {out.reason}")
  return out[f"condition_{kind}"]

"""Loading, validating and recording ml_collections configs."""

import copy
import importlib.util
import json
import os
import pathlib

import ml_collections


def load_config(
  path: str | pathlib.Path, relative_to: str | None = None
) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]` by path and calls its `get_config(arg)`.

  Stage configs compose model configs with it (`load_config("models/tiny.py", __file__)`), so
  every config file stays a standalone script that `--config=` can name, with no import paths.
  """
  path = str(path)
  arg = None
  if ":" in path:
    path, arg = path.split(":", 1)
  file = pathlib.Path(path)
  if relative_to is not None and not file.is_absolute():
    file = pathlib.Path(relative_to).parent / file
  if not file.exists():
    raise FileNotFoundError(f"config file not found: {file}")
  spec = importlib.util.spec_from_file_location(f"md_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what is written to the workdir and into checkpoints)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def record_config(config: ml_collections.ConfigDict, directory):
  """Writes `<directory>/config.json` and returns its `epath.Path`. An earlier one that differs is
  kept, renamed `config.<N>.json` (N = 1, 2, ... oldest first); the same config is not written
  twice. `directory` may be local or `gs://...` (all through epath, which keeps the `//`)."""
  from etils import epath

  remote = "://" in str(directory)
  directory = epath.Path(directory)
  path = directory / "config.json"
  text = config_to_json(config) + "\n"
  if path.exists():
    if path.read_text() == text:
      return path
    taken = [p.name.split(".")[1] for p in directory.glob("config.*.json")]
    number = 1 + max((int(n) for n in taken if n.isdigit()), default=0)
    path.rename(directory / f"config.{number}.json")
  if remote:  # an object store writes an object whole or not at all
    path.write_text(text)
    return path
  partial = directory / "config.json.partial"  # written whole, then renamed: never half a file
  partial.write_text(text)
  os.replace(partial, path)
  return path


# What a one-step UFOGen generator and its discriminator share with the diffusion run they start
# from (`configs/ufogen.py`, the main job's `ufogen` stage).
INHERITED_KEYS = ("model", "text_encoder", "latents", "schedule", "prediction", "data")


def inherit_from_diffusion(config, diffusion_config):
  """`config` (a ufogen config) with the diffusion run's model, text encoder, latent space,
  schedule, prediction and data, at the run's final resolution, the text encoder frozen."""
  config = config.copy_and_resolve_references()
  for key in INHERITED_KEYS:
    value = diffusion_config[key]
    config[key] = copy.deepcopy(value.to_dict() if hasattr(value, "to_dict") else value)
  prog = diffusion_config.get("progressive")
  if prog and prog.get("resolutions"):
    config.data.resolution = prog.resolutions[-1]
  config.text_encoder.train = False
  return config

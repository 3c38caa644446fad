"""Loading, validating and recording ml_collections configs."""

import importlib.util
import json
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

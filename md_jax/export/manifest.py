"""`manifest.json`: what an export directory holds, enough for an app to call every artifact.

{"format_version": 1, "source": {checkpoint, stage, step, config_sha256},
 "resolution": 512, "versions": {jax, jaxlib, flax, litert-converter, ...},
 "artifacts": [{"name": "unet_b2", "program": "unet", "batch": 2,
                "inputs": [{"name", "shape", "dtype"}, ...], "outputs": [...],
                "files": {"exported": "unet_b2/model.exported", "litert_fp32": ..., ...},
                "bytes": {format: size}, "reference": {"inputs": ..., "outputs": ...}}]}
"""

import importlib.metadata
import json
import pathlib

FORMAT_VERSION = 1
NAME = "manifest.json"
_PACKAGES = (
  "jax", "jaxlib", "flax", "litert-converter", "ai-edge-litert", "ai-edge-quantizer",
  "iree-base-compiler", "iree-base-runtime",
)  # fmt: skip


def versions() -> dict[str, str]:
  found = {}
  for package in _PACKAGES:
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      found[package] = None
  return found


def write(directory: pathlib.Path, manifest: dict) -> None:
  # Written last and atomically: a directory with a manifest is a complete export.
  tmp = directory / (NAME + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2) + "\n")
  tmp.replace(directory / NAME)


def read(directory: pathlib.Path) -> dict:
  path = pathlib.Path(directory) / NAME
  if not path.exists():
    raise FileNotFoundError(
      f"{directory}: no {NAME} (not an md_jax.export directory, or an unfinished one)"
    )
  manifest = json.loads(path.read_text())
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(
      f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
    )
  return manifest

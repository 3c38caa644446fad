"""StableHLO artifacts via `jax.export`: the serialized `Exported`, its MLIR bytecode, its text.

`model.exported` is what JAX reloads and calls (`jax.export.deserialize`); `model.mlirbc` is the
versioned StableHLO portable artifact (forward- and backward-compatible bytecode) that the LiteRT
converter and IREE read; `model.mlir` is for reading, with weight constants over a few elements
elided (`dense_resource<__elided__>`), since the full-size UNet's weights would be gigabytes of hex.
"""

import pathlib

import jax
from jax import export

from md_jax.export.programs import Program
from md_jax.models import cpu_lowering

TEXT_ELEMENTS_LIMIT = 16


def export_program(program: Program) -> export.Exported:
  # CPU is the platform the artifacts are verified on here; StableHLO itself is platform-neutral,
  # and the converters take it as such. Attention and convolutions lower as the plain ops the phone
  # runtimes want, not as the CPU's loops and matmuls (`models/cpu_lowering.py`).
  with_weights = lambda *inputs: program.fn(program.weights, *inputs)
  with cpu_lowering.portable():
    return export.export(jax.jit(with_weights), platforms=["cpu"])(
      *[spec.abstract() for spec in program.inputs]
    )


def mlir_text(portable_artifact: bytes) -> str:
  """Readable StableHLO with large constants elided (the bytecode keeps them)."""
  from md_jax.export import litert

  with litert.mlir_context() as context:
    module = litert.read_portable_artifact(context, portable_artifact)
    return module.operation.get_asm(large_elements_limit=TEXT_ELEMENTS_LIMIT)


def write(exported: export.Exported, directory: pathlib.Path) -> dict[str, str]:
  """Writes the three files; returns {format: file name}."""
  directory.mkdir(parents=True, exist_ok=True)
  files = {"exported": "model.exported", "mlirbc": "model.mlirbc", "mlir": "model.mlir"}
  (directory / files["exported"]).write_bytes(exported.serialize())
  (directory / files["mlirbc"]).write_bytes(exported.mlir_module_serialized)
  (directory / files["mlir"]).write_text(mlir_text(exported.mlir_module_serialized))
  return files


def load(path: pathlib.Path) -> export.Exported:
  return export.deserialize(bytearray(path.read_bytes()))

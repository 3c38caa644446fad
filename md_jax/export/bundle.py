"""Writes an export directory: per program and batch, the StableHLO, its conversions, and the
JAX model's outputs on fixed inputs (what `verify` holds every runtime to); then the manifest.

  DIR/manifest.json
  DIR/<program>_b<batch>/model.{exported,mlirbc,mlir}   StableHLO (md_jax.export.stablehlo)
                         fp32.tflite fp16.tflite int8.tflite   LiteRT (md_jax.export.litert)
                         int8_static.tflite                   (only when asked: calibrated)
                         host.vmfb android_arm64.vmfb         IREE (md_jax.export.iree)
                         reference.npz                        inputs + the JAX model's outputs
"""

import gc
import pathlib
import time

import jax
import numpy as np
from absl import logging

from md_jax.export import calibration, iree, litert, manifest, programs, stablehlo

# The default formats; CALIBRATED_FORMATS are exported only when asked for: they read the
# checkpoint's dataset and run the model a few hundred times (minutes at full size).
FORMATS = tuple(f"litert_{v}" for v in litert.VARIANTS if v not in litert.CALIBRATED) + tuple(
  f"iree_{t}" for t in iree.TARGETS
)
CALIBRATED_FORMATS = tuple(f"litert_{v}" for v in litert.CALIBRATED)
ALL_FORMATS = FORMATS + CALIBRATED_FORMATS
DEFAULT_CALIBRATION_SAMPLES = 256


def _check_formats(formats) -> None:
  unknown = sorted(set(formats) - set(ALL_FORMATS))
  if unknown:
    raise ValueError(f"--formats: unknown {unknown}; expected a subset of {list(ALL_FORMATS)}")


def write_reference(program: programs.Program, source, path: pathlib.Path) -> None:
  """Inputs and the outputs of the JAX model itself (jit of the program's function, not of the
  exported artifact), stored so verification needs neither the checkpoint nor md_jax's models."""
  inputs = programs.reference_inputs(program, source)
  outputs = jax.jit(program.fn)(program.weights, *[inputs[s.name] for s in program.inputs])
  outputs = outputs if isinstance(outputs, tuple) else (outputs,)
  arrays = {f"input/{k}": v for k, v in inputs.items()}
  for spec, value in zip(program.outputs, outputs, strict=True):
    arrays[f"output/{spec.name}"] = np.asarray(value)
  np.savez(path, **arrays)


def _write_litert(
  portable: bytes, program, directory: pathlib.Path, variants, calibrate
) -> dict[str, str]:
  t = time.perf_counter()
  names = [s.name for s in program.inputs], [s.name for s in program.outputs]
  fp32 = litert.convert(portable, *names, name=program.name)
  files = {}
  for variant in variants:
    inputs = calibrate() if variant in litert.CALIBRATED else None
    data = (
      fp32
      if variant == "fp32"
      else litert.quantize(fp32, variant, name=program.name, calibration=inputs)
    )
    (directory / f"{variant}.tflite").write_bytes(data)
    files[f"litert_{variant}"] = f"{variant}.tflite"
  logging.info("%s: LiteRT %s in %.1f s", program.name, variants, time.perf_counter() - t)
  return files


def _write_iree(portable: bytes, program, directory: pathlib.Path, target: str) -> dict[str, str]:
  t = time.perf_counter()
  (directory / f"{target}.vmfb").write_bytes(iree.compile_vmfb(portable, target, name=program.name))
  logging.info("%s: IREE %s in %.1f s", program.name, target, time.perf_counter() - t)
  return {f"iree_{target}": f"{target}.vmfb"}


def export_program(
  program: programs.Program, source, out: pathlib.Path, formats,
  calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> dict:  # fmt: skip
  """Every file of one program; returns its manifest entry. The `Exported` is dropped once written
  and each conversion's output goes straight to its file: at full size every one of them is a
  gigabyte-sized copy of the weights."""
  directory = out / program.name
  started = time.perf_counter()
  exported = stablehlo.export_program(program)
  files = stablehlo.write(exported, directory)
  del exported
  write_reference(program, source, directory / "reference.npz")
  files["reference"] = "reference.npz"
  portable = (directory / files["mlirbc"]).read_bytes()
  logging.info("%s: StableHLO %.1f MB in %.1f s", program.name, len(portable) / 1e6,
               time.perf_counter() - started)  # fmt: skip
  variants = [v for v in litert.VARIANTS if f"litert_{v}" in formats]
  if variants:
    calibrate = lambda: calibration.calibration_inputs(program, source, calibration_samples)
    files.update(_write_litert(portable, program, directory, variants, calibrate))
  for target in iree.TARGETS:
    if f"iree_{target}" in formats:
      files.update(_write_iree(portable, program, directory, target))
  return {
    "name": program.name,
    "program": program.kind,
    "batch": program.batch,
    "inputs": [s.to_json() for s in program.inputs],
    "outputs": [s.to_json() for s in program.outputs],
    "files": {k: f"{program.name}/{v}" for k, v in files.items()},
    "bytes": {k: (directory / v).stat().st_size for k, v in files.items()},
  }


def export_all(
  source, out, *, kinds=programs.PROGRAMS, batches=(1, 2), formats=FORMATS,
  calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> dict:  # fmt: skip
  """Exports `kinds` × `batches` from `source` into `out`; returns the manifest it wrote.
  `calibration_samples`: inputs the calibrated formats (CALIBRATED_FORMATS) calibrate on."""
  _check_formats(formats)
  if set(formats) & set(CALIBRATED_FORMATS):
    calibration.check_num_samples(calibration_samples)
    if set(kinds) - {"decoder"}:  # programs that take text calibrate on real captions
      calibration.training_captions_available(source)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  entries = []
  for program in programs.build_programs(source, kinds, batches):
    entries.append(export_program(program, source, out, formats, calibration_samples))
    print(f"exported {program.name}: {', '.join(entries[-1]['files'])}", flush=True)
    # The exported module and its conversions are gigabytes at full size: drop them before the
    # next program rather than holding every one until the end.
    jax.clear_caches()
    gc.collect()
  result = {
    "format_version": manifest.FORMAT_VERSION,
    "source": source.description,
    "resolution": source.resolution,
    "versions": manifest.versions(),
    "artifacts": entries,
  }
  manifest.write(out, result)
  return result

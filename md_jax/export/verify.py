r"""Runs every artifact of an export directory in its runtime and holds it to the JAX model.

  python -m md_jax.export.verify DIR [--runs=5] [--artifacts=one_step_b1,...] [--threads=N]

Each artifact is run on the inputs in its `reference.npz` by: the deserialized `Exported` in
JAX (`jax`), the LiteRT interpreter (`litert_fp32`, `litert_fp16`, `litert_int8` and, when
exported, `litert_int8_static`) and the IREE runtime (`iree_host`), and `android_arm64.vmfb` by
IREE's aarch64 runtime under qemu-user (`iree_android_qemu`, md_jax/export/android_emulation.py)
where qemu-aarch64 and that runtime are installed; where they are not, a line `skipped: <why>`
says what is missing. Each output ŷ is compared with the JAX model's own output y stored at
export time: max abs error max |y − ŷ|, which must stay within

    allowed = BOUNDS[runtime] × rms(y) + FLOORS[runtime]

a bound relative to the reference's scale (its RMS: max |y| is one element, and elementwise ratios
blow up where y ≈ 0 and say nothing) plus an absolute floor set by the format's precision, so that
a barely trained model, whose outputs are far smaller than the activations they are computed
from, is held to what its format can represent (see FLOORS). Bounds: jax 1e-4, litert_fp32 and
iree_host 1e-3 (floor 2^-24; iree_android_qemu is held to iree_host's), litert_fp16 2e-2 (floor
2^-17); int8 is reported, not bounded (dynamic-range int8 error depends on the weights). Also
reported: max_rel = max |y − ŷ| / max |y| (what earlier versions bounded), rel_rms =
max |y − ŷ| / rms(y), mean abs error.

Latency: one untimed call per runtime (load, compile), then `--runs` rounds that time every runtime
once each, interleaved, so machine load hits them alike; medians (under emulation: a process per
call, qemu's start and the module's load included, at qemu's speed, not a phone's). For the
one-step pipeline (and the decoder) each runtime's image is written to DIR/verify/.

Exit status 1 when a bound is exceeded (a `FAIL artifact/runtime: ...` line each), or with one
`FATAL ...` line naming the artifact and file when one is missing, truncated or unreadable (a
file's size is checked against the manifest's record first). Results also go to
DIR/verify/verify.json; the last line printed is one JSON object.
"""

import json
import os
import pathlib
import statistics
import struct
import sys
import time
import zipfile

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
# Per runtime: the bound on max |y − ŷ| / rms(y); None: reported, not bounded. Measured (tiny
# config, 2 to 300 steps, every program): jax ≤ 2.2e-6, LiteRT fp32 and IREE ≤ 6.6e-6, LiteRT fp16
# ≤ 3.9e-3 once outputs are past the floor's scale (BENCHMARKS.md's step-400 main job: 4.0e-3 of
# max |y|, ≈ 6e-3 of rms for images of rms 0.65), so fp16 gets 2e-2, 3× that (1e-2 of max |y|
# before), and the float32 runtimes keep theirs.
BOUNDS = {
  "jax": 1e-4,
  "litert_fp32": 1e-3,
  "litert_fp16": 2e-2,
  "litert_int8": None,
  # Reported, not bounded, like dynamic-range int8: 0.019 of rms on the main job's one-step
  # program, up to 0.07 on the 2-step tiny model (BENCHMARKS.md, static int8).
  "litert_int8_static": None,
  "iree_host": 1e-3,
}
# Absolute floors, in the output's units, added to BOUNDS × rms(y): what the format's precision
# leaves on an output however small it is. After 2 steps of the tiny config (tests/conftest.py's
# `diffusion_run`) the UNet's zero-initialised `conv_out` has weights ~4e-7 and its output is rms
# 6.5e-6 to 7.6e-6 (16 and 32 px), while the activations it is computed from, and every other
# program's output, are at unit scale (text embeddings rms 1.0, images 0.5-0.7).
#  * float32 runtimes (JAX, LiteRT fp32, IREE) order and fuse sums differently; every conv and
#    matmul reads unit-scale activations (GroupNorm / LayerNorm before each), so rounding of the
#    order of float32's unit roundoff 2^-24 ≈ 6e-8 of them may reach an output of any magnitude.
#    Measured on the 2-step UNet: ≤ 1.5e-11, far inside; the floor only keeps a near-zero output
#    from being held to a bound below float32's resolution of the values it came from.
#  * LiteRT fp16 stores weights as float16. Weights below its smallest normal 2^-14 ≈ 6.1e-5 are
#    subnormal, with a fixed spacing of 2^-24, so each is off by up to 2^-25 ≈ 3e-8 however small
#    it is: up to 7% of a 4e-7 weight. The output conv sums n such errors against unit-scale
#    activations (swish(GroupNorm(·)), rms 0.6): an error of rms 2^-25 / √3 × 0.6 × √n, set by n
#    and not by the output's size. Measured on the 2-step UNet (n = 3×3×32): max 4.4e-7 (16 px),
#    5.5e-7 and 7.2e-7 (32 px, batch 1 and 2), i.e. 2.2e-2 to 2.7e-2 of max |y|, which failed
#    these correct exports under the earlier bound (max |y − ŷ| / max |y| ≤ 1e-2), and 7e-2 to
#    9e-2 of rms(y); it stays ≤ 9e-7 through step 8 (conv_out's weights still below 2^-14), and
#    by step 12 the relative term dominates (allowed 4.1e-5, error 1.9e-6). A numpy model of
#    that conv reproduces it (max 5.6e-7, rms 1.9e-7 against 1.8e-7 measured) and gives 2.5e-6
#    for MobileDiffusion's n = 3×3×320 over 512-px latents, 5.1e-6 even at n = 3×3×1024 (the
#    widest conv any config has, anywhere).
#    The floor 2^-17 ≈ 7.6e-6 covers that with 1.5× to spare (the 2-step tiny UNet's with 10-17×)
#    and is 64× finer than fp16 resolves a unit-scale value (2^-11). A wrong model still fails:
#    another seed's 2-step UNet differs by 2.1e-5 to 2.6e-5 on the same inputs, 2.7-3.4× the
#    allowed ~7.8e-6 in fp16 and 300-400× the allowed in the float32 runtimes; trained outputs
#    are at unit scale, where the floor is negligible beside 2e-2 × rms.
_FP32_FLOOR = 2.0**-24
FLOORS = {
  "jax": _FP32_FLOOR,
  "litert_fp32": _FP32_FLOOR,
  "litert_fp16": 2.0**-17,
  "litert_int8": None,
  "litert_int8_static": None,
  "iree_host": _FP32_FLOOR,
}
# Runtimes that run another CPU's artifact under emulation: held to the bound and floor of the host
# runtime of the same compiler (the same float32 program, compiled for another CPU). Not in BOUNDS,
# the runtimes every host has: the CLI runs them where the emulator is installed and prints
# `skipped: <why>` where it is not; `verify()` runs them when `runtimes` names them.
EMULATED = {"iree_android_qemu": "iree_host"}
CLI_RUNTIMES = (*BOUNDS, *EMULATED)
# What a truncated or corrupted file raises in its loader: LiteRT and IREE check their files and
# raise ValueError; numpy's npz reader zipfile.BadZipFile, EOFError or ValueError. JAX reads
# `model.exported` with an unchecked flatbuffer reader, so damaged bytes surface as whichever
# error the reader trips on (struct.error past the end, AttributeError on a null field, ...).
_LOAD_ERRORS = (ValueError, RuntimeError, OSError, EOFError, zipfile.BadZipFile)
_FLATBUFFER_ERRORS = (struct.error, AttributeError, IndexError, TypeError)


def define_flags():
  flags.DEFINE_integer("runs", 5, "Timed rounds per artifact (every runtime once per round).")
  flags.DEFINE_list("artifacts", None, "Only these artifacts (default: all in the manifest).")
  flags.DEFINE_list("runtimes", list(CLI_RUNTIMES), "Only these runtimes.")
  flags.DEFINE_integer(
    "threads", None, "CPU threads for LiteRT and emulated IREE (default: every core)."
  )


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def artifact_file(directory: pathlib.Path, entry: dict, key: str) -> pathlib.Path:
  """The path of `entry`'s file `key`, checked to exist with the size the manifest records."""
  path = directory / entry["files"][key]
  if not path.is_file():
    raise FileNotFoundError(f"{entry['name']}: {path} ({key}) is missing")
  recorded = entry.get("bytes", {}).get(key)
  size = path.stat().st_size
  if recorded is not None and size != recorded:
    raise ValueError(
      f"{entry['name']}: {path} ({key}) has {size} bytes, the manifest records {recorded}: "
      "truncated or overwritten"
    )
  return path


def _load(entry: dict, key: str, path: pathlib.Path, load, errors=_LOAD_ERRORS):
  try:
    return load()
  except errors as e:
    raise ValueError(f"{entry['name']}: {path} ({key}) cannot be loaded: {_one_line(e)}") from e


def read_reference(directory: pathlib.Path, entry: dict) -> tuple[dict, np.ndarray]:
  """(inputs by name, expected output) from the artifact's `reference.npz`, read in full here so
  that a damaged file is named now, not halfway through a run."""
  path = artifact_file(directory, entry, "reference")

  def read():
    with np.load(path) as npz:
      return {k: npz[k] for k in npz.files}

  arrays = _load(entry, "reference", path, read)
  keys = [f"input/{s['name']}" for s in entry["inputs"]]
  keys.append(f"output/{entry['outputs'][0]['name']}")
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise ValueError(f"{entry['name']}: {path} (reference) has no {missing}")
  return {s["name"]: arrays[f"input/{s['name']}"] for s in entry["inputs"]}, arrays[keys[-1]]


def load_runtimes(directory: pathlib.Path, entry: dict, runtimes, threads=None, emulator=None):
  """{runtime: callable(inputs dict) → output} for each runtime this artifact has a file for
  (`iree_android_qemu` only given an `android_emulation.Emulator`)."""
  import jax

  from md_jax.export import iree, litert, stablehlo

  files = entry["files"]
  names = [s["name"] for s in entry["inputs"]]
  output = entry["outputs"][0]["name"]
  loaded = {}
  if "jax" in runtimes:
    path = artifact_file(directory, entry, "exported")
    exported = _load(
      entry, "exported", path, lambda: stablehlo.load(path), _LOAD_ERRORS + _FLATBUFFER_ERRORS
    )
    call = jax.jit(exported.call)

    def run_jax(inputs):
      out = call(*[inputs[n] for n in names])
      out = out[0] if isinstance(out, tuple | list) else out
      return np.asarray(jax.block_until_ready(out))

    loaded["jax"] = run_jax
  for variant in litert.VARIANTS:
    runtime = f"litert_{variant}"
    if runtime in runtimes and runtime in files:
      path = artifact_file(directory, entry, runtime)
      runner = _load(entry, runtime, path, lambda path=path: litert.Runner(path, threads))
      loaded[runtime] = lambda inputs, runner=runner: runner(inputs)[output]
  if "iree_host" in runtimes and "iree_host" in files:
    path = artifact_file(directory, entry, "iree_host")
    loaded["iree_host"] = _load(entry, "iree_host", path, lambda: iree.Runner(path, names))
  if emulator is not None and "iree_android_qemu" in runtimes and "iree_android_arm64" in files:
    from md_jax.export import android_emulation

    path = artifact_file(directory, entry, "iree_android_arm64")
    loaded["iree_android_qemu"] = android_emulation.Runner(
      emulator, path, names, threads=threads, name=f"{entry['name']}/iree_android_qemu"
    )
  return loaded


def errors(actual: np.ndarray, expected: np.ndarray, where: str) -> dict[str, float]:
  """max_abs (bounded), the reference's scale (rms_ref, max_ref), max_abs relative to each
  (rel_rms, max_rel) and mean_abs (how far most outputs are, e.g. for int8)."""
  if actual.shape != expected.shape:
    raise ValueError(f"{where}: output shape {actual.shape}, expected {expected.shape}")
  expected = expected.astype(np.float64)
  diff = np.abs(actual.astype(np.float64) - expected)
  max_abs = float(diff.max())
  rms_ref = float(np.sqrt(np.mean(np.square(expected))))
  max_ref = float(np.abs(expected).max())
  return {
    "max_abs": max_abs,
    "rms_ref": rms_ref,
    "max_ref": max_ref,
    "rel_rms": max_abs / max(rms_ref, 1e-30),
    "max_rel": max_abs / max(max_ref, 1e-30),
    "mean_abs": float(diff.mean()),
  }


def _bound_and_floor(runtime: str) -> tuple[float | None, float | None]:
  runtime = EMULATED.get(runtime, runtime)
  return BOUNDS[runtime], FLOORS[runtime]


def allowed(runtime: str, rms_ref: float) -> float | None:
  """The largest max |y − ŷ| that passes; None: reported, not bounded."""
  bound, floor = _bound_and_floor(runtime)
  if bound is None:
    return None
  return bound * rms_ref + floor


def verify_artifact(
  directory: pathlib.Path, entry: dict, runtimes, runs: int, threads=None, emulator=None
):
  """Rows {artifact, runtime, max_abs, rms_ref, max_ref, rel_rms, max_rel, mean_abs, bound, floor,
  allowed, ok, median_ms} for one artifact."""
  inputs, expected = read_reference(directory, entry)
  loaded = load_runtimes(directory, entry, runtimes, threads, emulator)
  outputs = {}
  for runtime, run in loaded.items():  # untimed: load, compile
    try:
      outputs[runtime] = run(inputs)
    except (ValueError, RuntimeError) as e:
      raise ValueError(f"{entry['name']}/{runtime}: failed on its reference inputs: "
                       f"{_one_line(e)}") from e  # fmt: skip
  times = {runtime: [] for runtime in loaded}
  for _ in range(runs):
    for runtime, run in loaded.items():
      start = time.perf_counter()
      run(inputs)
      times[runtime].append(time.perf_counter() - start)
  rows = []
  for runtime, actual in outputs.items():
    error = errors(actual, expected, f"{entry['name']}/{runtime}")
    limit = allowed(runtime, error["rms_ref"])
    bound, floor = _bound_and_floor(runtime)
    rows.append({
      "artifact": entry["name"],
      "runtime": runtime,
      **error,
      "bound": bound,
      "floor": floor,
      "allowed": limit,
      "ok": limit is None or error["max_abs"] <= limit,
      "median_ms": 1e3 * statistics.median(times[runtime]) if runs else None,
    })  # fmt: skip
  if entry["program"] in ("one_step", "decoder"):
    _write_images(directory / "verify", entry["name"], {"reference": expected, **outputs})
  return rows


def _write_images(out: pathlib.Path, name: str, images: dict) -> None:
  from md_jax import visualize

  for runtime, image in images.items():
    pixels = np.clip(np.round(np.asarray(image) * 255), 0, 255).astype(np.uint8)
    pixels = pixels[0] if len(pixels) == 1 else visualize.make_grid(pixels)
    visualize.save_png(pixels, out / f"{name}_{runtime}.png", {
      "artifact": name, "runtime": runtime,
    })  # fmt: skip


def _read_manifest(directory: pathlib.Path) -> list[dict]:
  from md_jax.export import manifest

  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no such export directory")
  try:
    entries = manifest.read(directory)["artifacts"]
  except json.JSONDecodeError as e:
    raise ValueError(f"{directory / manifest.NAME}: not valid JSON ({e})") from e
  except KeyError as e:
    raise ValueError(f"{directory / manifest.NAME}: no {e} key") from e
  return entries


def verify(
  directory, *, artifacts=None, runtimes=tuple(BOUNDS), runs: int = 5, threads=None, skipped=None
):
  """All rows for the artifacts of `directory`; raises on an unknown artifact or runtime, and on a
  missing, truncated or unreadable file (naming the artifact and the file). An emulated runtime
  in `runtimes` whose emulator is not installed is printed as `skipped: <why>` and, given a list
  `skipped`, appended to it as {artifact, runtime, why}."""
  from md_jax.export import android_emulation, manifest

  directory = pathlib.Path(directory)
  entries = _read_manifest(directory)
  unknown = sorted(set(runtimes) - set(CLI_RUNTIMES))
  if unknown:
    raise ValueError(f"--runtimes: unknown {unknown}; expected a subset of {list(CLI_RUNTIMES)}")
  if artifacts:
    missing = sorted(set(artifacts) - {e["name"] for e in entries})
    if missing:
      raise ValueError(f"--artifacts: {missing} not in {directory / manifest.NAME}")
    entries = [e for e in entries if e["name"] in artifacts]
  emulate = "iree_android_qemu" in runtimes
  android = {e["name"] for e in entries if "iree_android_arm64" in e["files"]}
  emulator, why = android_emulation.availability() if emulate and android else (None, "")
  rows = []
  for entry in entries:
    artifact_rows = verify_artifact(directory, entry, runtimes, runs, threads, emulator)
    for row in artifact_rows:
      print(_format_row(row), flush=True)
    rows += artifact_rows
    if entry["name"] not in android or emulator is not None:
      continue
    if emulate:
      print(f"{entry['name']:<16} iree_android_qemu: skipped: {why}", flush=True)
      if skipped is not None:
        skipped.append({"artifact": entry["name"], "runtime": "iree_android_qemu", "why": why})
    else:
      print(f"{entry['name']:<16} iree_android_arm64: cross-compiled, not run (iree_android_qemu "
            "runs it under qemu-user)")  # fmt: skip
  return rows


def _format_row(row) -> str:
  limit = "(report)" if row["allowed"] is None else f"≤ {row['allowed']:.2e}"
  latency = "" if row["median_ms"] is None else f"{row['median_ms']:10.1f} ms"
  status = "ok" if row["ok"] else "EXCEEDED"
  return (
    f"{row['artifact']:<16} {row['runtime']:<17} max_abs {row['max_abs']:.2e} {limit:<10} "
    f"{status:<8} rms_ref {row['rms_ref']:.1e} rel_rms {row['rel_rms']:.1e} "
    f"max_rel {row['max_rel']:.1e} mean_abs {row['mean_abs']:.1e}{latency}"
  )


def _format_failure(row) -> str:
  return (
    f"FAIL {row['artifact']}/{row['runtime']}: max abs error {row['max_abs']:.2e} > allowed "
    f"{row['allowed']:.2e} = {row['bound']:.0e} × rms {row['rms_ref']:.2e} of the reference "
    f"+ floor {row['floor']:.1e} (max |y − ŷ| / rms {row['rel_rms']:.1e})"
  )


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m md_jax.export.verify DIR [--runs=N]")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  directory = pathlib.Path(argv[1])
  skipped = []
  try:
    rows = verify(
      directory, artifacts=FLAGS.artifacts, runtimes=FLAGS.runtimes, runs=FLAGS.runs,
      threads=FLAGS.threads, skipped=skipped,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {_one_line(e)}")
  out = directory / "verify"
  out.mkdir(parents=True, exist_ok=True)
  (out / "verify.json").write_text(json.dumps(rows, indent=2) + "\n")
  failed = [r for r in rows if not r["ok"]]
  for r in failed:
    print(_format_failure(r))
  print(json.dumps({
    "directory": str(directory), "passed": not failed, "rows": rows, "skipped": skipped,
  }))  # fmt: skip
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Runs every artifact of an export directory in its runtime and holds it to the JAX model.

  python -m md_jax.export.verify DIR [--runs=5] [--artifacts=one_step_b1,...] [--threads=N]

Each artifact is run on the inputs in its `reference.npz` by: the deserialized `Exported` in
JAX (`jax`), the LiteRT interpreter (`litert_fp32`, `litert_fp16`, `litert_int8`) and the IREE
runtime (`iree_host`); `android_arm64.vmfb` is cross-compiled and cannot run here. Each output is
compared with the JAX model's own output stored at export time: max abs error, max relative
error, relative to the reference's largest magnitude (max |y − ŷ| / max |y|: elementwise ratios
blow up where y ≈ 0 and say nothing), and mean abs error. Latency: one untimed call per runtime
(load, compile), then `--runs` rounds that time every runtime once each, interleaved, so machine
load hits them alike; medians. For the one-step pipeline (and the decoder) each runtime's image is
written to DIR/verify/.

Bounds (exit status 1 when one is exceeded, naming it): jax 1e-4, litert_fp32 1e-3, litert_fp16
1e-2, iree_host 1e-3; int8 is reported, not bounded (dynamic-range int8 error depends on the
weights). Results also go to DIR/verify/verify.json; the last line printed is one JSON object.
"""

import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
BOUNDS = {
  "jax": 1e-4,
  "litert_fp32": 1e-3,
  "litert_fp16": 1e-2,
  "litert_int8": None,
  "iree_host": 1e-3,
}
NOT_RUNNABLE_HERE = ("iree_android_arm64",)


def define_flags():
  flags.DEFINE_integer("runs", 5, "Timed rounds per artifact (every runtime once per round).")
  flags.DEFINE_list("artifacts", None, "Only these artifacts (default: all in the manifest).")
  flags.DEFINE_list("runtimes", list(BOUNDS), "Only these runtimes.")
  flags.DEFINE_integer("threads", None, "CPU threads for LiteRT (default: every core).")


def load_runtimes(directory: pathlib.Path, entry: dict, runtimes, threads=None) -> dict:
  """{runtime: callable(inputs dict) → output} for each runtime this artifact has a file for."""
  import jax

  from md_jax.export import iree, litert, stablehlo

  files = entry["files"]
  names = [s["name"] for s in entry["inputs"]]
  output = entry["outputs"][0]["name"]
  loaded = {}
  if "jax" in runtimes:
    call = jax.jit(stablehlo.load(directory / files["exported"]).call)

    def run_jax(inputs):
      out = call(*[inputs[n] for n in names])
      out = out[0] if isinstance(out, tuple | list) else out
      return np.asarray(jax.block_until_ready(out))

    loaded["jax"] = run_jax
  for variant in litert.VARIANTS:
    runtime = f"litert_{variant}"
    if runtime in runtimes and runtime in files:
      runner = litert.Runner(directory / files[runtime], threads)
      loaded[runtime] = lambda inputs, runner=runner: runner(inputs)[output]
  if "iree_host" in runtimes and "iree_host" in files:
    loaded["iree_host"] = iree.Runner(directory / files["iree_host"], names)
  return loaded


def errors(actual: np.ndarray, expected: np.ndarray, where: str) -> dict[str, float]:
  """max_abs, max_rel (bounded) and mean_abs (how far most outputs are, e.g. for int8)."""
  if actual.shape != expected.shape:
    raise ValueError(f"{where}: output shape {actual.shape}, expected {expected.shape}")
  diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
  max_abs = float(diff.max())
  return {
    "max_abs": max_abs,
    "max_rel": max_abs / max(float(np.abs(expected).max()), 1e-30),
    "mean_abs": float(diff.mean()),
  }


def verify_artifact(directory: pathlib.Path, entry: dict, runtimes, runs: int, threads=None):
  """Rows {artifact, runtime, max_abs, max_rel, bound, ok, median_ms} for one artifact."""
  reference = np.load(directory / entry["files"]["reference"])
  inputs = {s["name"]: reference[f"input/{s['name']}"] for s in entry["inputs"]}
  expected = reference[f"output/{entry['outputs'][0]['name']}"]
  loaded = load_runtimes(directory, entry, runtimes, threads)
  outputs = {runtime: run(inputs) for runtime, run in loaded.items()}  # untimed: load, compile
  times = {runtime: [] for runtime in loaded}
  for _ in range(runs):
    for runtime, run in loaded.items():
      start = time.perf_counter()
      run(inputs)
      times[runtime].append(time.perf_counter() - start)
  rows = []
  for runtime, actual in outputs.items():
    error = errors(actual, expected, f"{entry['name']}/{runtime}")
    bound = BOUNDS[runtime]
    rows.append({
      "artifact": entry["name"],
      "runtime": runtime,
      **error,
      "bound": bound,
      "ok": bound is None or error["max_rel"] <= bound,
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


def verify(directory, *, artifacts=None, runtimes=tuple(BOUNDS), runs: int = 5, threads=None):
  """All rows for the artifacts of `directory`; raises on an unknown artifact or runtime."""
  from md_jax.export import manifest

  directory = pathlib.Path(directory)
  entries = manifest.read(directory)["artifacts"]
  unknown = sorted(set(runtimes) - set(BOUNDS))
  if unknown:
    raise ValueError(f"--runtimes: unknown {unknown}; expected a subset of {list(BOUNDS)}")
  if artifacts:
    missing = sorted(set(artifacts) - {e["name"] for e in entries})
    if missing:
      raise ValueError(f"--artifacts: {missing} not in {directory / manifest.NAME}")
    entries = [e for e in entries if e["name"] in artifacts]
  rows = []
  for entry in entries:
    artifact_rows = verify_artifact(directory, entry, runtimes, runs, threads)
    for row in artifact_rows:
      print(_format_row(row), flush=True)
    rows += artifact_rows
    skipped = [f for f in entry["files"] if f in NOT_RUNNABLE_HERE]
    if skipped:
      print(f"{entry['name']:<16} {', '.join(skipped)}: cross-compiled, not run on this host")
  return rows


def _format_row(row) -> str:
  bound = "report" if row["bound"] is None else f"≤ {row['bound']:.0e}"
  latency = "" if row["median_ms"] is None else f"{row['median_ms']:10.1f} ms"
  status = "ok" if row["ok"] else "EXCEEDED"
  return (
    f"{row['artifact']:<16} {row['runtime']:<12} max_abs {row['max_abs']:.2e} "
    f"max_rel {row['max_rel']:.2e} ({bound}) {status:<8} mean_abs {row['mean_abs']:.1e}{latency}"
  )


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m md_jax.export.verify DIR [--runs=N]")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  directory = pathlib.Path(argv[1])
  try:
    rows = verify(
      directory, artifacts=FLAGS.artifacts, runtimes=FLAGS.runtimes, runs=FLAGS.runs,
      threads=FLAGS.threads,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  out = directory / "verify"
  out.mkdir(parents=True, exist_ok=True)
  (out / "verify.json").write_text(json.dumps(rows, indent=2) + "\n")
  failed = [r for r in rows if not r["ok"]]
  for r in failed:
    print(f"FAIL {r['artifact']}/{r['runtime']}: max relative error {r['max_rel']:.2e} > "
          f"{r['bound']:.0e}")  # fmt: skip
  print(json.dumps({"directory": str(directory), "passed": not failed, "rows": rows}))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Latency of one exported artifact in every runtime on this CPU, side by side.

  python -m md_jax.export --workdir=workdirs/main --out=export/main --batch=1 --programs=one_step
  python -m md_jax.benchmarks.export_latency --dir=export/main [--artifact=one_step_b1] [--runs=5]

Runs `md_jax.export.verify`'s measurement: one untimed call per runtime (load, compile), then
`--runs` rounds timing JAX (jit of the deserialized `Exported`), LiteRT fp32/fp16/int8 (XNNPACK,
every core) and IREE (llvm-cpu, local-task driver) once each, interleaved; medians, and each
runtime's median over JAX's. Errors against the JAX model are checked as in verify. The last line
is one JSON object.
"""

import json
import pathlib

from absl import app, flags

from md_jax.benchmarks import timing


def define_flags():
  flags.DEFINE_string("dir", None, "An md_jax.export output directory.", required=True)
  flags.DEFINE_string("artifact", "one_step_b1", "Which artifact of the manifest.")
  flags.DEFINE_integer("runs", 5, "Timed rounds.")


def main(argv):
  del argv
  from md_jax.export import manifest, verify

  FLAGS = flags.FLAGS
  directory = pathlib.Path(FLAGS.dir)
  exported = manifest.read(directory)
  entries = {e["name"]: e for e in exported["artifacts"]}
  if FLAGS.artifact not in entries:
    raise app.UsageError(f"--artifact={FLAGS.artifact!r} not in {directory}: {sorted(entries)}")
  source = exported["source"]
  rows = verify.verify_artifact(
    directory, entries[FLAGS.artifact], tuple(verify.BOUNDS), FLAGS.runs
  )
  jax_ms = next(r["median_ms"] for r in rows if r["runtime"] == "jax")
  print(
    f"{FLAGS.artifact} ({source.get('weights') or source['checkpoint']}), medians of {FLAGS.runs}:"
  )
  for r in rows:
    print(f"  {r['runtime']:<12} {r['median_ms']:10.1f} ms  {r['median_ms'] / jax_ms:5.2f}× JAX  "
          f"max_rel {r['max_rel']:.1e}")  # fmt: skip
  result = {
    **timing.machine(),
    "artifact": FLAGS.artifact,
    "source": source,
    "runs": FLAGS.runs,
    "median_ms": {r["runtime"]: r["median_ms"] for r in rows},
    "over_jax": {r["runtime"]: r["median_ms"] / jax_ms for r in rows},
    "max_rel": {r["runtime"]: r["max_rel"] for r in rows},
    "all_within_bounds": all(r["ok"] for r in rows),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Latency of one exported program with softmax and with relu attention, side by side (Sec. 3.2).

  python -m md_jax.export --config=configs/mobilediffusion.py --resolution=512 --batch=1 \
      --programs=unet --formats=litert_fp32,litert_int8 --out=export/unet512_softmax
  python -m md_jax.export --config=configs/relu_finetune.py --resolution=512 --batch=1 \
      --programs=unet --formats=litert_fp32,litert_int8 --out=export/unet512_relu
  python -m md_jax.benchmarks.attention_latency --softmax=export/unet512_softmax \
      --relu=export/unet512_relu [--artifact=unet_b1] [--runtimes=litert_fp32,litert_int8]

The two exports are the same random weights (same config, same seed) but for the attention
nonlinearity, which is why relu exists: softmax's exponentials and row sums are what an integer
kernel handles worst. Every runtime of both artifacts is loaded, called once untimed, then timed
in interleaved rounds (softmax fp32, relu fp32, softmax int8, ...); medians, relu ÷ softmax per
runtime, and each artifact's max relative error against its own JAX reference. The last line is
one JSON object.
"""

import json
import pathlib
import statistics

from absl import app, flags

from md_jax.benchmarks import timing

ATTENTIONS = ("softmax", "relu")


def define_flags():
  flags.DEFINE_string(
    "softmax", None, "md_jax.export output with softmax attention.", required=True
  )
  flags.DEFINE_string("relu", None, "md_jax.export output with relu attention.", required=True)
  flags.DEFINE_string("artifact", "unet_b1", "Which artifact of both manifests.")
  flags.DEFINE_list(
    "runtimes", ["litert_fp32", "litert_int8"], "Runtimes to time (verify's names)."
  )
  flags.DEFINE_integer("runs", 5, "Timed rounds.")


def load(directory: pathlib.Path, artifact: str, runtimes) -> tuple[dict, dict, dict]:
  """(manifest source, reference (inputs, expected), {runtime: callable}) of one export; a
  missing artifact or runtime file is a ValueError naming the directory."""
  from md_jax.export import manifest, verify

  exported = manifest.read(directory)
  entries = {e["name"]: e for e in exported["artifacts"]}
  if artifact not in entries:
    raise ValueError(f"--artifact={artifact!r} is not in {directory}: {sorted(entries)}")
  entry = entries[artifact]
  missing = [r for r in runtimes if r not in entry["files"]]
  if missing:
    raise ValueError(f"{directory}/{artifact} has no {missing} file; export with --formats")
  return (
    exported["source"],
    verify.read_reference(directory, entry),
    (verify.load_runtimes(directory, entry, runtimes)),
  )


def main(argv):
  del argv
  from md_jax.export import verify

  FLAGS = flags.FLAGS
  runtimes = list(FLAGS.runtimes)
  sources, calls, errors = {}, {}, {}
  shapes = {}
  for attention in ATTENTIONS:
    directory = pathlib.Path(getattr(FLAGS, attention))
    source, (inputs, expected), loaded = load(directory, FLAGS.artifact, runtimes)
    sources[attention] = source
    shapes[attention] = {name: x.shape for name, x in inputs.items()}
    for runtime in runtimes:
      run = loaded[runtime]
      actual = run(inputs)  # untimed: load, allocate, warm up
      errors[attention, runtime] = verify.errors(actual, expected, f"{directory}/{runtime}")
      calls[attention, runtime] = lambda run=run, inputs=inputs: run(inputs)
  if shapes["softmax"] != shapes["relu"]:
    raise app.UsageError(f"the two artifacts take different inputs: {shapes}")
  keys = [(a, r) for r in runtimes for a in ATTENTIONS]
  times = dict(zip(keys, timing.interleaved_times(FLAGS.runs, *(calls[k] for k in keys))))
  median_ms = {k: 1e3 * statistics.median(t) for k, t in times.items()}
  print(f"{FLAGS.artifact}, medians of {FLAGS.runs} interleaved rounds:")
  for runtime in runtimes:
    soft, relu = median_ms["softmax", runtime], median_ms["relu", runtime]
    print(f"  {runtime:<12} softmax {soft:9.1f} ms  relu {relu:9.1f} ms  relu/softmax "
          f"{relu / soft:5.3f}  max_rel {errors['softmax', runtime]['max_rel']:.1e} / "
          f"{errors['relu', runtime]['max_rel']:.1e}")  # fmt: skip
  result = {
    **timing.machine(),
    "artifact": FLAGS.artifact,
    "sources": sources,
    "runs": FLAGS.runs,
    "median_ms": {f"{a}_{r}": ms for (a, r), ms in median_ms.items()},
    "relu_over_softmax": {r: median_ms["relu", r] / median_ms["softmax", r] for r in runtimes},
    "max_rel": {f"{a}_{r}": e["max_rel"] for (a, r), e in errors.items()},
  }
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

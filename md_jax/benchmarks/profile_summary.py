r"""Where a profiled step's device time goes: a text summary of a `jax.profiler` trace.

    python -m md_jax.benchmarks.profile_summary DIR [--steps=N] [--top=30]

DIR is the `log_dir` of `jax.profiler.trace(DIR, create_perfetto_trace=True)` (e.g. the
`--profile_dir` of `md_jax.benchmarks.train_step`); the newest `*.trace.json.gz` under it is read.
Prints, per device timeline (on the CPU backend: per XLA host thread), the busy time per step,
and the most expensive ops by name, with their share of the busy time. A device line's busy time
far under the step's wall time means the step is waiting on the host (dispatch, transfers) or on
launch gaps, not on kernels; on a CPU, that the threads wait on each other.
Last line: one JSON object of the per-line totals.
"""

import collections
import glob
import gzip
import json
import os
import re

from absl import app, flags

_STEPS = flags.DEFINE_integer("steps", 1, "Steps inside the trace: times are divided by this.")
_TOP = flags.DEFINE_integer("top", 30, "Ops to list per device line.")

# Trailing instance numbers (fusion.123, loop_add_fusion_7) are dropped so that repeated ops of
# one kind add up.
_INSTANCE = re.compile(r"([._]\d+)+$")


def newest_trace(log_dir: str) -> str:
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(
      f"no *.trace.json.gz under {log_dir!r}: profile with "
      "jax.profiler.trace(..., create_perfetto_trace=True)"
    )
  return max(paths, key=os.path.getmtime)


# On a CPU backend XLA's ops run on host threads: the executing client thread and the intra-op
# pool. These events only wrap or wait on the ops inside them, so they are not op time.
_CPU_XLA_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")
_CPU_WRAPPERS = re.compile(r"^(ThunkExecutor::|SlinkyThreadPool::|ThreadpoolListener::|end: )")


def device_lines(trace: dict) -> dict[str, list[dict]]:
  """Complete ('X') events of each accelerator timeline, keyed 'process / thread'. A trace with
  no accelerator timeline (the CPU backend) gives the op events of XLA's host threads instead."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  lines, cpu_lines = collections.defaultdict(list), collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X":
      continue
    process = processes.get(e.get("pid"), "")
    thread = threads.get((e["pid"], e.get("tid")), e.get("tid"))
    if "/device:" in process and "CUSTOM" not in process:
      lines[f"{process} / {thread}"].append(e)
    elif str(thread).startswith(_CPU_XLA_THREADS) and not _CPU_WRAPPERS.match(e["name"]):
      cpu_lines[f"{process} / {thread}"].append(e)
  return lines or cpu_lines


def summarize(events: list[dict], steps: int, top: int) -> tuple[dict, list[tuple]]:
  busy = sum(e.get("dur", 0.0) for e in events) / 1e3 / steps
  start = min(e["ts"] for e in events)
  end = max(e["ts"] + e.get("dur", 0.0) for e in events)
  by_name = collections.Counter()
  counts = collections.Counter()
  for e in events:
    name = _INSTANCE.sub("", e["name"])
    by_name[name] += e.get("dur", 0.0) / 1e3 / steps
    counts[name] += 1
  totals = {
    "busy_ms_per_step": round(busy, 3),
    "span_ms_per_step": round((end - start) / 1e3 / steps, 3),
    "events_per_step": len(events) // steps,
  }
  rows = [(ms, counts[name] // steps, name) for name, ms in by_name.most_common(top)]
  return totals, rows


def print_summary(log_dir: str, steps: int, top: int) -> dict:
  """Prints each device line's totals and top ops of the newest trace under `log_dir`; returns
  the totals by line."""
  path = newest_trace(log_dir)
  with gzip.open(path) as f:
    trace = json.load(f)
  result = {"trace": path}
  for line, events in sorted(device_lines(trace).items()):
    totals, rows = summarize(events, steps, top)
    result[line] = totals
    print(f"\n== {line}: {totals}")
    for ms, count, name in rows:
      share = 100 * ms / max(totals["busy_ms_per_step"], 1e-9)
      print(f"{ms:9.3f} ms {share:5.1f}% ×{count:<5d} {name[:110]}")
  return result


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m md_jax.benchmarks.profile_summary DIR")
  print(json.dumps(print_summary(argv[1], _STEPS.value, _TOP.value)))


if __name__ == "__main__":
  app.run(main)

"""What the latency benchmarks share: interleaved timing and the machine a figure was taken on."""

import datetime
import platform
import time

import jax


def interleaved_times(runs: int, *fns) -> list[list[float]]:
  """Seconds of each of `fns` over `runs` rounds, timed a, b, a, b, …, so drift in a shared
  machine's load hits every function alike. Each fn must block until its work is done."""
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return times


def machine() -> dict:
  """Date, backend and device of the figures, for BENCHMARKS.md."""
  device = jax.devices()[0]
  return {
    "date": datetime.date.today().isoformat(),
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
    "processor": platform.processor() or platform.machine(),
  }

"""The profile summariser that says where a step's device time goes (benchmarks/profile_summary)."""

import gzip
import json

import pytest

from md_jax.benchmarks import profile_summary


def _trace():
  """Two steps on a GPU stream, plus host events that must not count."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/device:CUSTOM:Megascale"}},
  ]
  kernels = []
  for step in range(2):
    t = step * 1000.0
    kernels += [
      {"ph": "X", "pid": 1, "tid": 7, "ts": t, "dur": 300.0, "name": "gemm_fusion_dot.12"},
      {"ph": "X", "pid": 1, "tid": 7, "ts": t + 300, "dur": 100.0, "name": "gemm_fusion_dot.3"},
      {"ph": "X", "pid": 1, "tid": 7, "ts": t + 400, "dur": 50.0, "name": "loop_add_fusion_7"},
    ]
  host = [
    {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 5000.0, "name": "PjitFunction"},
    {"ph": "X", "pid": 3, "tid": 1, "ts": 0.0, "dur": 5000.0, "name": "megascale"},
  ]
  return {"traceEvents": meta + kernels + host}


def test_device_time_per_step_grouped_by_op():
  lines = profile_summary.device_lines(_trace())
  assert list(lines) == ["/device:GPU:0 / Stream #7"]  # host and custom timelines left out
  totals, rows = profile_summary.summarize(lines["/device:GPU:0 / Stream #7"], steps=2, top=5)
  assert totals == {"busy_ms_per_step": 0.45, "span_ms_per_step": 0.725, "events_per_step": 3}
  # Instance numbers are dropped so repeated ops add up: 400 µs of gemm per step, two launches.
  assert [name for _, _, name in rows] == ["gemm_fusion_dot", "loop_add_fusion"]
  assert [count for _, count, _ in rows] == [2, 1]
  assert [ms for ms, _, _ in rows] == pytest.approx([0.4, 0.05])


def test_cpu_backend_ops_are_read_from_the_xla_host_threads():
  """No accelerator timeline: the ops on XLA's host threads count, their wrappers and Python
  do not."""
  meta = [
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "train_step.py"}},
    {"ph": "M", "name": "thread_name", "pid": 2, "tid": 2, "args": {"name": "tf_XLAEigen/42"}},
  ]
  ops = [
    {"ph": "X", "pid": 2, "tid": 2, "ts": 0.0, "dur": 900.0, "name": "ThunkExecutor::Execute"},
    {"ph": "X", "pid": 2, "tid": 2, "ts": 10.0, "dur": 600.0, "name": "ynn_fusion.3"},
    {"ph": "X", "pid": 2, "tid": 2, "ts": 700.0, "dur": 100.0, "name": "multiply_add_fusion.9"},
    {"ph": "X", "pid": 2, "tid": 2, "ts": 650.0, "dur": 20.0, "name": "SlinkyThreadPool::Await"},
    {"ph": "X", "pid": 2, "tid": 1, "ts": 0.0, "dur": 1000.0, "name": "PjitFunction"},
  ]
  lines = profile_summary.device_lines({"traceEvents": meta + ops})
  assert list(lines) == ["/host:CPU / tf_XLAEigen/42"]
  totals, rows = profile_summary.summarize(lines["/host:CPU / tf_XLAEigen/42"], steps=1, top=5)
  assert totals["busy_ms_per_step"] == pytest.approx(0.7)
  assert [name for _, _, name in rows] == ["ynn_fusion", "multiply_add_fusion"]
  # With an accelerator timeline present, host threads are left out.
  assert list(profile_summary.device_lines(_trace())) == ["/device:GPU:0 / Stream #7"]


def test_newest_trace_is_found_and_a_missing_one_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz under"):
    profile_summary.newest_trace(str(tmp_path))
  run = tmp_path / "plugins" / "profile" / "2026_11_23"
  run.mkdir(parents=True)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump(_trace(), f)
  assert profile_summary.newest_trace(str(tmp_path)) == str(run / "host.trace.json.gz")

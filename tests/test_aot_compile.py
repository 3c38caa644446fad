"""Ahead-of-time compilation of the tiny train step for a small TPU slice (needs libtpu)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile for",
)
def test_tiny_step_compiles_for_v5e_2x2_and_reports_memory():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the fake CPU devices are irrelevant to a TPU topology
  result = subprocess.run(
      [
          sys.executable, "launch/aot_compile.py", "--config=configs/diffusion.py:tiny",
          "--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=4",
          "--config.progressive.resolutions=(32,)", "--config.progressive.batch_sizes=(32,)",
          "--config.progressive.steps=(1,)", "--json",
      ],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  (phase,) = report["phases"]
  assert phase["chips"] == 4 and phase["global_batch_size"] == 32 and phase["fits"]
  assert 0 < phase["argument_gib"] < phase["total_gib"] < phase["hbm_gib"]
  assert phase["tflops_per_chip"] > 0

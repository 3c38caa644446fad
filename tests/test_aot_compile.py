"""Ahead-of-time compilation of the tiny train step for a small TPU slice (needs libtpu)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parents[1]
NEEDS_LIBTPU = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to compile for",
)


def _tpu_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the fake CPU devices are irrelevant to a TPU topology
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # another process may hold libtpu (its lockfile)
  return env


@pytest.mark.slow
@NEEDS_LIBTPU
def _compile_tiny(*flags, batch=32, status=0):
  """`launch/aot_compile.py` on the tiny step (one 32 px phase); its JSON report."""
  result = subprocess.run(
      [
          sys.executable, "launch/aot_compile.py", "--config=configs/diffusion.py:tiny",
          "--config.progressive.resolutions=(32,)", f"--config.progressive.batch_sizes=({batch},)",
          "--config.progressive.steps=(1,)", "--json", *flags,
      ],
      cwd=REPO, env=_tpu_env(), capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert result.returncode == status, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@NEEDS_LIBTPU
def test_a_phase_the_compiler_cannot_fit_is_reported_not_a_traceback():
  flags = ("--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=4")
  report = _compile_tiny(*flags, batch=131072, status=1)  # ~19.5 GiB of temporaries per chip
  (phase,) = report["phases"]
  assert not phase["fits"] and phase["total_gib"] > phase["hbm_gib"]
  assert phase["compiler"].startswith("out of HBM")


def test_tiny_step_compiles_for_v5e_2x2_and_reports_memory():
  report = _compile_tiny("--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=4")
  (phase,) = report["phases"]
  assert phase["chips"] == 4 and phase["global_batch_size"] == 32 and phase["fits"]
  assert 0 < phase["argument_gib"] < phase["total_gib"] < phase["hbm_gib"]
  assert phase["tflops_per_chip"] > 0


_SLICE_LAYOUT = """
from jax.experimental import topologies
from md_jax.infra import sharding
devices = topologies.get_topology_desc("v5e:2x2", platform="tpu", num_slices=2).devices
mesh = sharding.create_mesh({"data": 4, "fsdp": 2, "dcn_data": 2}, devices)
print([[d.slice_index for d in row] for row in mesh.devices])
try:
  sharding.create_mesh({"data": 4, "fsdp": 2, "dcn_data": 4}, devices)
except ValueError as e:
  print(e)
"""


@NEEDS_LIBTPU
def test_a_multi_slice_mesh_keeps_fsdp_inside_a_slice_and_spreads_data_over_the_slices():
  result = subprocess.run(
    [sys.executable, "-c", _SLICE_LAYOUT], cwd=REPO, env=_tpu_env(), capture_output=True,
    text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  layout, error = result.stdout.strip().splitlines()[-2:]
  # data 4 = 2 slices × 2 within each; each row (one data index) lies in one slice.
  assert layout == "[[0, 0], [0, 0], [1, 1], [1, 1]]"
  assert error == "config.mesh.dcn_data=4, but the 8 devices form 2 slice(s)"


@pytest.mark.slow
@NEEDS_LIBTPU
def test_tiny_step_compiles_for_two_v5e_slices():
  report = _compile_tiny(
    "--topology=v5e:2x2", "--num_slices=2", "--config.mesh.data=2", "--config.mesh.fsdp=4"
  )
  (phase,) = report["phases"]
  assert report["num_slices"] == 2 and phase["chips"] == 8 and phase["fits"]


@pytest.mark.slow
@NEEDS_LIBTPU
def test_the_cached_latents_step_compiles_without_the_encoders_work():
  flags = ("--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=4")
  (images,) = _compile_tiny(*flags)["phases"]
  report = _compile_tiny(*flags, "--cached_latents")
  (cached,) = report["phases"]
  assert report["cached_latents"] and cached["fits"]
  # The tiny text encoder's 32 × 77 tokens and the projection encoder leave the step.
  assert 0 < cached["flops_per_chip"] < 0.95 * images["flops_per_chip"]

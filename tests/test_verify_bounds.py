"""`md_jax.export.verify`'s bound on a barely trained model: a correct export of the 2-step
checkpoint passes in every runtime (its UNet's outputs are ~1e-5, where LiteRT fp16's error is set
by float16's subnormal weights, not by the output's size), another model's output fails it by a
clear margin, and a damaged export directory ends in one line naming the artifact and file."""

import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from md_jax.export import bundle, manifest, programs, verify

REPO = pathlib.Path(__file__).parents[1]
FORMATS = ("litert_fp32", "litert_fp16", "litert_int8", "iree_host")
BOUNDED = [r for r in verify.BOUNDS if verify.BOUNDS[r] is not None]


@pytest.fixture(scope="module")
def unet_export(diffusion_run, tmp_path_factory):
  """The 2-step checkpoint's UNet at batch 1 in every format that runs here."""
  out = tmp_path_factory.mktemp("verify_bounds")
  source = programs.source_from_checkpoint(str(diffusion_run), resolution=16)
  assert source.description["step"] == 2
  bundle.export_all(source, out, kinds=("unet",), batches=(1,), formats=FORMATS)
  return out


@pytest.fixture(scope="module")
def other_seed_unet(shapes_data_dir, tmp_path_factory):
  """The same config trained the same 2 steps from another seed: a wrong model of the same
  shapes (the training step compiles once: tests/conftest.py's persistent cache)."""
  from tests.test_trainer import _config, _train

  workdir = tmp_path_factory.mktemp("diffusion_seed1")
  _train(_config(shapes_data_dir, total_steps=2, seed=1), workdir)
  source = programs.source_from_checkpoint(str(workdir), resolution=16)
  (program,) = programs.build_programs(source, ["unet"], [1])
  return program


def _rows(rows):
  return {r["runtime"]: r for r in rows}


def test_a_correct_export_of_a_2_step_checkpoint_passes_in_every_runtime(unet_export):
  rows = _rows(verify.verify(unet_export, runs=0))
  assert set(rows) == {"jax", *FORMATS}
  assert all(r["ok"] for r in rows.values()), rows
  fp16 = rows["litert_fp16"]
  # The regime this is about: outputs ~1e-5, and fp16's error a large fraction of them (the
  # earlier bound, max |y − ŷ| / max |y| ≤ 1e-2, failed this correct export) ...
  assert fp16["rms_ref"] < 1e-4 and fp16["max_rel"] > 1e-2
  # ... passed by the floor (BOUNDS × rms alone would not), with room to spare.
  assert verify.BOUNDS["litert_fp16"] * fp16["rms_ref"] < fp16["max_abs"]
  assert fp16["max_abs"] < fp16["allowed"] / 4
  for runtime in BOUNDED:
    r = rows[runtime]
    assert r["allowed"] == pytest.approx(r["bound"] * r["rms_ref"] + r["floor"])
  # verify.json's rows: the earlier keys (max_rel, bound) and the scale the bound is relative to.
  assert {"max_abs", "max_rel", "bound", "rms_ref", "rel_rms", "floor", "allowed", "ok"} <= set(
    fp16
  )


def test_another_models_output_fails_in_every_bounded_runtime(
  unet_export, other_seed_unet, tmp_path
):
  tampered = tmp_path / "tampered"
  shutil.copytree(unet_export, tampered)
  path = tampered / "unet_b1" / "reference.npz"
  reference = dict(np.load(path))
  inputs = [reference[f"input/{s.name}"] for s in other_seed_unet.inputs]
  wrong = jax.jit(other_seed_unet.fn)(other_seed_unet.weights, *inputs)
  reference["output/prediction"] = np.asarray(wrong)
  np.savez(path, **reference)
  # The manifest records each file's size; the swapped reference is a file it vouches for.
  m = manifest.read(tampered)
  m["artifacts"][0]["bytes"]["reference"] = path.stat().st_size
  manifest.write(tampered, m)

  rows = _rows(verify.verify(tampered, runs=0))
  for runtime in BOUNDED:
    r = rows[runtime]
    # A clear margin, not the edge: measured ≥ 3× in fp16 (the floor) and ≥ 100× in float32.
    assert not r["ok"] and r["max_abs"] > 2 * r["allowed"], r
  assert rows["jax"]["max_abs"] > 100 * rows["jax"]["allowed"]


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def test_a_truncated_tflite_is_one_line_naming_the_artifact_and_file(unet_export, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(unet_export, broken)
  _truncate(broken / "unet_b1" / "fp16.tflite")
  result = subprocess.run(
    [sys.executable, "-m", "md_jax.export.verify", str(broken), "--runs=0"],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL unet_b1: ") and "unet_b1/fp16.tflite" in last, last
  assert "truncated" in last


def _corrupt_head(path: pathlib.Path) -> None:
  """Same size (passes the manifest's size check), unreadable content."""
  data = bytearray(path.read_bytes())
  data[:64] = bytes(64)
  path.write_bytes(bytes(data))


def _corrupt_tail(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[-64:] = bytes(64)
  path.write_bytes(bytes(data))


@pytest.mark.parametrize(
  ("damage", "runtime", "error", "message"),
  [
    ("no_directory", "jax", FileNotFoundError, r"missing: no such export directory"),
    ("no_manifest", "jax", FileNotFoundError, r"no manifest\.json"),
    ("manifest.json:truncate", "jax", ValueError, r"manifest\.json: not valid JSON"),
    ("unet_b1/reference.npz:delete", "jax", FileNotFoundError, r"^unet_b1: .*/reference\.npz"),
    ("unet_b1/reference.npz:truncate", "jax", ValueError, r"^unet_b1: .*/reference\.npz .*trunc"),
    ("unet_b1/reference.npz:tail", "jax", ValueError, r"^unet_b1: .*/reference\.npz .*cannot be"),
    ("unet_b1/model.exported:truncate", "jax", ValueError, r"^unet_b1: .*/model\.exported .*trunc"),
    ("unet_b1/model.exported:head", "jax", ValueError, r"^unet_b1: .*/model\.exported .*cannot"),
    ("unet_b1/fp32.tflite:head", "litert_fp32", ValueError, r"^unet_b1: .*/fp32\.tflite .*cannot"),
    ("unet_b1/host.vmfb:truncate", "iree_host", ValueError, r"^unet_b1: .*/host\.vmfb .*truncated"),
    ("unet_b1/host.vmfb:head", "iree_host", ValueError, r"^unet_b1: .*/host\.vmfb .*cannot be"),
  ],
)
def test_a_damaged_export_raises_one_line_naming_the_artifact_and_file(
  unet_export, tmp_path, damage, runtime, error, message
):
  directory = tmp_path / "export"
  if damage == "no_directory":
    directory = tmp_path / "missing"
  elif damage == "no_manifest":
    directory.mkdir()
  else:
    shutil.copytree(unet_export, directory)
    name, how = damage.split(":")
    damage_file = {
      "delete": pathlib.Path.unlink,
      "truncate": _truncate,
      "head": _corrupt_head,
      "tail": _corrupt_tail,
    }[how]
    damage_file(directory / name)
  with pytest.raises(error, match=message) as raised:
    verify.verify(directory, runs=0, runtimes=(runtime,))
  assert "\n" not in str(raised.value)

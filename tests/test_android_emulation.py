"""The Android arm64 `.vmfb` executed: the export's `android_arm64.vmfb` run by IREE's aarch64
runtime under qemu-user (`verify`'s runtime `iree_android_qemu`) computes what the JAX model
computes, within the host IREE module's bound; where qemu or the aarch64 runtime is missing, verify
says so in a `skipped:` line rather than passing silently.

The emulated run needs qemu-aarch64, the aarch64 glibc/libstdc++ and IREE's aarch64
`iree-run-module` (md_jax/export/android_emulation.py): CI has none of them, so there the emulated
test is skipped with the install commands; the skip report is tested everywhere.
"""

import pathlib
import zipfile

import pytest

from md_jax.export import android_emulation, bundle, programs, verify


@pytest.fixture(scope="module")
def android_export(diffusion_run, tmp_path_factory):
  """The 2-step checkpoint's text encoder at batch 1, Android arm64 only (the smallest program:
  one cross-compile)."""
  out = tmp_path_factory.mktemp("android_export")
  source = programs.source_from_checkpoint(str(diffusion_run), resolution=16)
  bundle.export_all(
    source, out, kinds=("text_encoder",), batches=(1,), formats=("iree_android_arm64",)
  )
  return out


def test_the_android_module_run_under_qemu_meets_the_host_iree_bound(android_export):
  emulator, why = android_emulation.availability()
  if emulator is None:
    pytest.skip(
      "the Android arm64 .vmfb cannot be run under emulation here (expected on CI, which has no "
      f"qemu): {why}"
    )
  skipped = []
  rows = verify.verify(
    android_export, runtimes=("jax", "iree_android_qemu"), runs=0, skipped=skipped
  )
  assert skipped == []
  row = {r["runtime"]: r for r in rows}["iree_android_qemu"]
  # Held to iree_host's bound and floor: the same float32 program, compiled for another CPU.
  assert (row["bound"], row["floor"]) == (verify.BOUNDS["iree_host"], verify.FLOORS["iree_host"])
  assert row["allowed"] == pytest.approx(verify.allowed("iree_host", row["rms_ref"]))
  assert row["ok"], row
  assert row["rms_ref"] > 0.1  # text embeddings at unit scale: the bound is not the floor's
  assert row["max_rel"] <= 1e-3


def test_a_missing_emulator_is_reported_as_skipped_with_what_to_install(
  android_export, monkeypatch, tmp_path, capsys
):
  monkeypatch.setenv(android_emulation.RUN_MODULE_ENV, str(tmp_path / "no_runner"))
  skipped = []
  rows = verify.verify(
    android_export, runtimes=("jax", "iree_android_qemu"), runs=0, skipped=skipped
  )
  assert [r["runtime"] for r in rows] == ["jax"]
  (entry,) = skipped
  assert entry["artifact"] == "text_encoder_b1" and entry["runtime"] == "iree_android_qemu"
  assert "apt-get install qemu-user" in entry["why"] and "iree-base-runtime==" in entry["why"]
  out = capsys.readouterr().out
  assert "text_encoder_b1  iree_android_qemu: skipped: " in out
  # Either what the runner variable names or, earlier, qemu or the sysroot is what is missing.
  assert "no_runner: no such file" in out or "no qemu-aarch64" in out or "no aarch64" in out
  # Not asked for (verify()'s default runtimes): said so, not silent either.
  verify.verify(android_export, runtimes=("jax",), runs=0)
  assert "iree_android_arm64: cross-compiled, not run" in capsys.readouterr().out


def test_a_runner_for_another_cpu_is_refused_naming_it(monkeypatch):
  x86_runner = pathlib.Path(verify.__file__)  # any file that is not an aarch64 ELF
  monkeypatch.setenv(android_emulation.RUN_MODULE_ENV, str(x86_runner))
  monkeypatch.setattr(android_emulation.shutil, "which", lambda name: "/usr/bin/" + name)
  monkeypatch.setattr(android_emulation, "_SYSROOT_FILES", ())
  with pytest.raises(android_emulation.Unavailable, match=r"verify\.py is not an aarch64 ELF"):
    android_emulation.find()


def test_the_runner_is_unpacked_once_from_the_wheel_in_a_directory(monkeypatch, tmp_path):
  elf = b"\x7fELF\x02\x01\x01" + bytes(11) + (183).to_bytes(2, "little") + bytes(44)  # aarch64
  wheels = tmp_path / "pip_download"
  wheels.mkdir()
  wheel = wheels / "iree_base_runtime-3.13.0-cp311-cp311-manylinux_2_28_aarch64.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("iree/_runtime_libs/iree-run-module", elf)
  monkeypatch.setenv(android_emulation.RUN_MODULE_ENV, str(wheels))
  monkeypatch.setattr(android_emulation, "CACHE", tmp_path / "cache")
  monkeypatch.delenv("QEMU_LD_PREFIX", raising=False)
  monkeypatch.setattr(android_emulation.shutil, "which", lambda name: "/usr/bin/" + name)
  monkeypatch.setattr(android_emulation, "_SYSROOT_FILES", ())
  emulator = android_emulation.find()
  runner = emulator.run_module
  assert runner == tmp_path / "cache" / wheel.name.removesuffix(".whl") / "iree-run-module"
  assert runner.read_bytes() == elf and runner.stat().st_mode & 0o111
  assert emulator.command("--help")[:3] == ["/usr/bin/qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
  wheel.unlink()  # unpacked once: the cache serves it from now on
  monkeypatch.delenv(android_emulation.RUN_MODULE_ENV)
  assert android_emulation.find().run_module == runner

"""Runs the Android arm64 `.vmfb` on this x86-64 host: IREE's aarch64 `iree-run-module` under
qemu-user (user-mode emulation), so the module the phone gets is executed and checked against the
JAX model like the host's (`verify`'s runtime `iree_android_qemu`), not only compiled.

What it needs (see `install_hint()`):
  qemu-aarch64         apt-get install qemu-user
  aarch64 glibc and libstdc++ (the runner is dynamically linked against them), under
                       /usr/aarch64-linux-gnu or $QEMU_LD_PREFIX:
                       apt-get install libc6-arm64-cross libstdc++6-arm64-cross
  iree-run-module for aarch64, from IREE's aarch64 runtime wheel (`iree-base-runtime`, the same
                       version as the compiler that wrote the module):
                       $MD_JAX_IREE_AARCH64_RUN_MODULE names the binary, the wheel (unpacked once
                       into ~/.cache/md_jax/iree_aarch64) or a directory holding the wheel (e.g.
                       what `pip download` wrote).

Why the Android module runs in a Linux runtime: IREE's llvm-cpu backend links each executable as
an "embedded ELF" (the default, `--iree-llvmcpu-link-embedded=true`): a freestanding
`aarch64-unknown-unknown-eabi-elf` object that IREE's own loader maps, calling nothing in the OS's
libc or dynamic linker. The Android triple only sets the CPU features and reserves x18 (Android's
shadow call stack register), so the same bytes load in IREE's Linux aarch64 runtime; no other link
mode is needed. qemu-aarch64's default CPU ("max") has the module's +dotprod and +fullfp16.

Latency measured here is emulation (qemu translating every aarch64 instruction), not a phone's.
"""

import dataclasses
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile
import zipfile

import numpy as np

RUNTIME = "iree_android_qemu"
ARTIFACT = "iree_android_arm64"  # the manifest's key for android_arm64.vmfb
RUN_MODULE_ENV = "MD_JAX_IREE_AARCH64_RUN_MODULE"
CACHE = pathlib.Path.home() / ".cache" / "md_jax" / "iree_aarch64"
_WHEEL_MEMBER = "iree/_runtime_libs/iree-run-module"
_WHEEL_GLOB = "iree_base_runtime-*aarch64*.whl"
_DEFAULT_SYSROOT = "/usr/aarch64-linux-gnu"
_SYSROOT_FILES = ("lib/ld-linux-aarch64.so.1", "lib/libc.so.6", "lib/libstdc++.so.6")
_EM_AARCH64 = 183  # ELF e_machine


class Unavailable(Exception):
  """What is missing to run an aarch64 module here, in one line, with how to install it."""


@dataclasses.dataclass(frozen=True)
class Emulator:
  qemu: str
  run_module: pathlib.Path
  sysroot: pathlib.Path

  def command(self, *args: str) -> list[str]:
    return [self.qemu, "-L", str(self.sysroot), str(self.run_module), *args]


def _compiler_version() -> str:
  try:
    return importlib.metadata.version("iree-base-compiler")
  except importlib.metadata.PackageNotFoundError:
    return "<the iree-base-compiler version that wrote the module>"


def install_hint() -> str:
  """The commands that provide everything `find` looks for (Debian/Ubuntu)."""
  version = _compiler_version()
  return (
    "apt-get install qemu-user libc6-arm64-cross libstdc++6-arm64-cross; "
    f"pip download iree-base-runtime=={version} --platform manylinux_2_28_aarch64 "
    "--only-binary=:all: --no-deps -d DIR; "
    f"export {RUN_MODULE_ENV}=DIR"
  )


def _is_aarch64_elf(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    header = f.read(20)
  return header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == _EM_AARCH64


def unpack_wheel(wheel: pathlib.Path, cache: pathlib.Path | None = None) -> pathlib.Path:
  """The wheel's `iree-run-module`, extracted once into `cache/<wheel name>/` (default CACHE; only
  that file: the binary needs nothing else from the wheel)."""
  target = (cache or CACHE) / wheel.name.removesuffix(".whl") / "iree-run-module"
  if target.is_file():
    return target
  try:
    with zipfile.ZipFile(wheel) as z:
      data = z.read(_WHEEL_MEMBER)
  except (zipfile.BadZipFile, KeyError, OSError) as e:
    raise Unavailable(f"{wheel}: not an IREE runtime wheel with {_WHEEL_MEMBER} ({e})") from e
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = target.with_suffix(f".{os.getpid()}.tmp")  # atomic: tests may run concurrently
  partial.write_bytes(data)
  partial.chmod(0o755)
  partial.replace(target)
  return target


def _newest_matching(paths: list[pathlib.Path]) -> pathlib.Path:
  """Of several runtime versions, the compiler's own (a module's bytecode is read by its version's
  runtime), else the last by name."""
  same = [p for p in paths if f"iree_base_runtime-{_compiler_version()}-" in str(p)]
  return sorted(same or paths)[-1]


def _run_module(given: str | None) -> pathlib.Path:
  given = given or os.environ.get(RUN_MODULE_ENV)
  if not given:
    unpacked = list(CACHE.glob("*/iree-run-module"))
    if unpacked:
      return _newest_matching(unpacked)
    raise Unavailable(
      f"no aarch64 iree-run-module: ${RUN_MODULE_ENV} is unset and {CACHE} has none"
    )
  path = pathlib.Path(given).expanduser()
  if path.is_dir():
    wheels = list(path.glob(_WHEEL_GLOB))
    if not wheels:
      raise Unavailable(f"${RUN_MODULE_ENV}={given}: no {_WHEEL_GLOB} in that directory")
    path = _newest_matching(wheels)
  if not path.is_file():
    raise Unavailable(f"${RUN_MODULE_ENV}={given}: no such file")
  if path.suffix == ".whl":
    path = unpack_wheel(path)
  if not _is_aarch64_elf(path):
    raise Unavailable(f"${RUN_MODULE_ENV}={given}: {path} is not an aarch64 ELF executable")
  return path


def find(run_module: str | None = None) -> Emulator:
  """qemu-aarch64, the aarch64 sysroot and runner; raises Unavailable saying what is missing."""
  qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
  if not qemu:
    raise Unavailable("no qemu-aarch64 on PATH (apt-get install qemu-user)")
  sysroot = pathlib.Path(os.environ.get("QEMU_LD_PREFIX") or _DEFAULT_SYSROOT)
  missing = [f for f in _SYSROOT_FILES if not (sysroot / f).exists()]
  if missing:
    raise Unavailable(
      f"no aarch64 {', '.join(missing)} under {sysroot} "
      "(apt-get install libc6-arm64-cross libstdc++6-arm64-cross, or set $QEMU_LD_PREFIX)"
    )
  return Emulator(qemu, _run_module(run_module), sysroot)


def availability(run_module: str | None = None) -> tuple[Emulator | None, str]:
  """(the emulator, "") or (None, why not, with the install commands)."""
  try:
    return find(run_module), ""
  except Unavailable as e:
    return None, f"{e}; to install: {install_hint()}"


class Runner:
  """One `.vmfb` run by the emulated `iree-run-module`, a process per call: inputs go in as `.npy`
  files in the program's order (`--input=@x.npy`), the output comes back the same way. The time of
  a call includes starting qemu and loading the module."""

  def __init__(self, emulator: Emulator, path, input_names, *, threads: int | None = None,
               name: str = "") -> None:  # fmt: skip
    self._emulator = emulator
    self._path = pathlib.Path(path)
    self._names = list(input_names)
    self._threads = threads
    self._name = name or str(path)

  def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="md_jax_qemu_") as tmp:
      tmp = pathlib.Path(tmp)
      args = ["--device=local-task", f"--module={self._path}", "--function=main"]
      if self._threads:
        args.append(f"--task_topology_group_count={self._threads}")
      for i, name in enumerate(self._names):
        np.save(tmp / f"{i}.npy", np.ascontiguousarray(inputs[name]))
        args.append(f"--input=@{tmp / f'{i}.npy'}")
      args.append(f"--output=@{tmp / 'out.npy'}")
      result = subprocess.run(self._emulator.command(*args), capture_output=True, text=True)
      if result.returncode != 0 or not (tmp / "out.npy").is_file():
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(
          f"{self._name}: emulated iree-run-module exited {result.returncode}: {lines[-1].strip()}"
        )
      return np.load(tmp / "out.npy")

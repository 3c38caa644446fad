"""StableHLO → IREE `.vmfb` (iree-base-compiler, llvm-cpu backend) and running one in the IREE
runtime.

Targets: `host` (this machine's CPU features, run by `verify`) and `android_arm64` (cross-compiled
for an Android phone's aarch64 CPU: copy the `.vmfb` and run it with the IREE runtime there;
`verify` runs it here under qemu-user when that is installed, `export/android_emulation.py`).
"""

import numpy as np

TARGETS = {
  "host": ["--iree-llvmcpu-target-cpu=host"],
  # API level 34 (Android 14); generic armv8.2-a with dot-product and fp16 arithmetic, which every
  # phone SoC since 2019 has.
  "android_arm64": [
    "--iree-llvmcpu-target-triple=aarch64-none-linux-android34",
    "--iree-llvmcpu-target-cpu-features=+v8.2a,+dotprod,+fullfp16",
  ],
}


def compile_vmfb(portable_artifact: bytes, target: str, *, name: str) -> bytes:
  import iree.compiler

  if target not in TARGETS:
    raise ValueError(f"{name}: IREE target {target!r}: expected one of {sorted(TARGETS)}")
  try:
    return iree.compiler.compile_str(
      portable_artifact,
      target_backends=["llvm-cpu"],
      input_type="stablehlo",
      extra_args=TARGETS[target],
    )
  except iree.compiler.CompilerToolError as e:
    lines = [line for line in str(e).splitlines() if "error:" in line] or [str(e).splitlines()[0]]
    raise ValueError(f"{name}: IREE compile for {target} failed: {lines[0].strip()}") from e


class Runner:
  """One host `.vmfb` on IREE's multi-threaded CPU driver; inputs in the program's order."""

  def __init__(self, path, input_names):
    import iree.runtime

    self._module = iree.runtime.load_vm_flatbuffer_file(str(path), driver="local-task")
    self._names = list(input_names)

  def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
    result = self._module.main(*[inputs[n] for n in self._names])
    return np.asarray(result.to_host())

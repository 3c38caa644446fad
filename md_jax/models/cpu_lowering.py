"""Layers that XLA:CPU runs faster written another way: the switch between the two lowerings.

On a CPU, attention at a thousand tokens and more runs as loops over heads and query blocks
(`chunked_attention.py`) and small-image convolutions as matmuls (`cpu_conv.py`), several times
faster there than XLA:CPU's own lowering of the same function. TPUs and GPUs want the plain ops:
`on_cpu` stages both with `jax.lax.platform_dependent`, whose choice is made when lowering for a
platform (an AOT compile for a TPU slice on a CPU host lowers the plain ops). The mobile exports
and the model-FLOP counts trace under `portable()`, which keeps the plain ops everywhere: the phone
converters and runtimes want one batched matmul and one convolution, not loops, and a FLOP count
is the model's, not a lowering's (the CPU attention's backward recomputes its scores).
"""

import contextlib
import contextvars

import jax

_portable = contextvars.ContextVar("portable", default=False)


@contextlib.contextmanager
def portable():
  """Within it, `on_cpu` traces the plain ops on every platform."""
  token = _portable.set(True)
  try:
    yield
  finally:
    _portable.reset(token)


def on_cpu(*args, cpu, default):
  """`cpu(*args)` when lowered for a CPU, `default(*args)` elsewhere and under `portable()`."""
  if _portable.get():
    return default(*args)
  return jax.lax.platform_dependent(*args, cpu=cpu, default=default)

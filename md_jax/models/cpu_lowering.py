"""Layers that XLA:CPU runs faster written another way: the switch between the two lowerings.

On a CPU, attention at a thousand tokens and more runs as loops over heads and query blocks
(`chunked_attention.py`) and small-image convolutions as matmuls (`cpu_conv.py`), several times
faster there than XLA:CPU's own lowering of the same function. TPUs and GPUs want the plain ops:
`on_cpu` stages both with `jax.lax.platform_dependent`, whose choice is made when lowering for a
platform (an AOT compile for a TPU slice on a CPU host lowers the plain ops). The mobile exports
and the model-FLOP counts trace under `portable()`, which keeps the plain ops everywhere: the phone
converters and runtimes want one batched matmul and one convolution, not loops, and a FLOP count
is the model's, not a lowering's (the CPU attention's backward recomputes its scores).

In bfloat16, a CPU's matmuls accumulate in float32 (`dot_general`, `accumulate_in_float32`):
XLA:CPU runs that form on AMX-BF16 (2.3 ms for a 1024×2880 · 2880×320 product against 9.5 ms in
float32 on a 2-core Xeon) and a bf16-output dot on a generic loop (10.3 ms), and the sums are the
more accurate for it.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

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


def accumulate_in_float32(*operands) -> dict:
  """`preferred_element_type=float32` where every operand is bfloat16 (for a CPU-only branch's
  matmuls: round the result back to bf16 after), else nothing."""
  if all(x.dtype == jnp.bfloat16 for x in operands):
    return {"preferred_element_type": jnp.float32}
  return {}


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`jax.lax.dot_general`; bf16 operands accumulate in float32 when lowered for a CPU (then
  round to bf16: the same result type), which XLA:CPU runs on AMX-BF16. For flax's
  `nn.Dense(dot_general=...)`."""
  plain = functools.partial(
    jax.lax.dot_general,
    dimension_numbers=dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
    **kwargs,
  )
  wider = accumulate_in_float32(lhs, rhs)
  if preferred_element_type is not None or not wider:
    return plain(lhs, rhs)

  def cpu(a, b):
    out = jax.lax.dot_general(a, b, dimension_numbers, precision, **wider, **kwargs)
    return out.astype(a.dtype)

  return on_cpu(lhs, rhs, cpu=cpu, default=plain)

"""Model FLOPs of a jitted function, counted from its jaxpr: the same on every backend.

MFU is conventionally "matmul and convolution FLOPs the model asks for, per second". XLA's cost
analysis is not that on every backend: on a GPU it does not count convolutions lowered to cuDNN
custom calls (a UNet's step reads 4–5.6× low there), and `Lowered.cost_analysis()` is None. So
count from the jaxpr instead: 2·MACs of every `dot_general` and `conv_general_dilated`, walking
into nested jaxprs (jit, remat, custom_vjp, cond's costliest branch, scan × its length).
Rematerialised recomputation is counted, as it is in the program; elementwise work is not.
`model_flops` traces the plain ops (`cpu_lowering.portable`), not the CPU's attention loops, whose
backward pass recomputes the scores: the same count whatever the backend.
"""

import math

import jax
from jax.extend import core

from md_jax.models import cpu_lowering


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  out = eqn.outvars[0].aval
  return 2 * contracted * math.prod(out.shape)


def _conv_flops(eqn) -> int:
  kernel = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dims = eqn.params["dimension_numbers"]
  # Each output element is a dot over (input features / groups) × spatial window.
  kernel_in = kernel.shape[dims.rhs_spec[1]]
  window = math.prod(kernel.shape[d] for d in dims.rhs_spec[2:])
  return 2 * kernel_in * window * math.prod(out.shape)


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, core.Jaxpr):
        yield v


def jaxpr_flops(jaxpr) -> int:
  """Matmul + convolution FLOPs of a jaxpr (e.g. `jax.jit(f).trace(...).jaxpr.jaxpr`)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "while":
      raise ValueError("model_flops: a while loop's trip count is unknown; use scan")
    else:
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
  return total


def model_flops(fn, *args) -> int:
  """Matmul + convolution FLOPs of one call of `fn(*args)` (args may be shape structs)."""
  with cpu_lowering.portable():
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)

"""LoRA (Hu et al., 2021) as a reparametrisation of a params tree, for UFOGen's LoRA variant.

    W = W0 + (alpha / rank) · A·B     for every kernel the predicate selects

The modules are untouched: `init_lora` builds the factors beside a frozen base tree, `merge` gives
the tree the module applies. A conv kernel (kh, kw, in, out) is adapted as the matrix
(kh·kw·in, out). B starts at zero ("null-initialised"), so the merged params start exactly equal
to the base, and the first steps move only what the adversarial objective asks for.

The factors mirror the base tree's structure, holding {"lora_a", "lora_b"} where a kernel is
adapted and nothing elsewhere, so Orbax saves them like any params and sharding rules apply
(A keeps the kernel's input axis name, B its output axis name).
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def is_kernel(path: tuple[str, ...], leaf) -> bool:
  """The default selection: every dense or conv kernel (2-D or more), no norms, biases, tables."""
  return path[-1] == "kernel" and np.ndim(leaf) >= 2


def _names(leaf):
  return leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None


def init_lora(
  params, rank: int, key, *, select: Callable[[tuple[str, ...], object], bool] = is_kernel
) -> dict:
  """LoRA factors for the kernels of `params` (boxed or not) that `select` picks.

  A ~ N(0, 1/in) as in the paper's Kaiming-style init, B = 0. Boxed input gives boxed factors.
  """
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  flat = jax.tree_util.tree_flatten_with_path(
    params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )[0]
  out: dict = {}
  for index, (path, leaf) in enumerate(flat):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    value = nn.meta.unbox(leaf)
    if not select(keys, value):
      continue
    fan_in, fan_out = int(np.prod(value.shape[:-1])), value.shape[-1]
    a = jax.random.normal(jax.random.fold_in(key, index), (fan_in, rank), value.dtype)
    a = a / np.sqrt(fan_in)
    b = jnp.zeros((rank, fan_out), value.dtype)
    names = _names(leaf)
    if names is not None:
      a = nn.LogicallyPartitioned(a, (names[-2] if len(names) == 2 else None, None))
      b = nn.LogicallyPartitioned(b, (None, names[-1]))
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = {"lora_a": a, "lora_b": b}
  if not out:
    raise ValueError("LoRA selected no kernel in the params tree")
  return out


def merge(base, lora: dict, alpha: float, rank: int):
  """The params the module applies: base + (alpha / rank)·A·B where `lora` has factors."""
  return merge_weighted(base, [(lora, alpha / rank)])


def is_factors(node) -> bool:
  return isinstance(node, dict) and set(node) == {"lora_a", "lora_b"}


def merge_weighted(base, weighted):
  """base + Σ wᵢ·Aᵢ·Bᵢ for [(factors_i, w_i), ...] (wᵢ = scaleᵢ·alphaᵢ/rankᵢ): several LoRAs
  merged at once, each where it has factors; a kernel none adapts is returned as it is. The sum
  is formed in the factors' dtype and cast to the kernel's once."""

  def walk(node, trees):
    trees = [(f, w) for f, w in trees if f is not None]
    if not trees:
      return node
    if any(is_factors(f) for f, _ in trees):
      total = None
      for factors, weight in trees:
        term = weight * (factors["lora_a"] @ factors["lora_b"]).reshape(node.shape)
        total = term if total is None else total + term
      return node + total.astype(node.dtype)
    return {k: walk(v, [(f.get(k), w) for f, w in trees]) for k, v in node.items()}

  return walk(base, list(weighted))

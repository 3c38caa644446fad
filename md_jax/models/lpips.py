"""LPIPS perceptual distance (Zhang et al., 2018) on VGG16 features, as SD's VAE is trained with.

    d(x, y) = Σ_layers mean_hw Σ_c w_c · (n(φ(x)) − n(φ(y)))²,  n = unit norm over channels

with φ the relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 activations of VGG16 and w ≥ 0 the learned
linear weights. Weights come from one local safetensors file (keys `conv1_1.kernel`, `conv1_1.bias`,
…, `lin0` … `lin4`), written once from the PyTorch originals by `md_jax.tools.convert_lpips` (see
its docstring); nothing is downloaded. `width_divisor` narrows every layer (tests build small
random-weight files); a file's own widths decide it when loaded.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from md_jax.models import partitioned

# (block, convs per block, width) of VGG16's feature extractor; a 2×2 max-pool between blocks.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# LPIPS's input normalisation for images in [-1, 1] (its `ScalingLayer`).
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def conv_names() -> list[str]:
  return [f"conv{b}_{i}" for b, n, _ in VGG16_BLOCKS for i in range(1, n + 1)]


class LPIPS(nn.Module):
  width_divisor: int = 1

  @nn.compact
  def __call__(self, x, y):
    """Per-example distance (B,) between image batches in [-1, 1]."""
    both = (jnp.concatenate([x, y]) - _SHIFT) / _SCALE
    h = both
    distance = jnp.zeros((x.shape[0],), jnp.float32)
    for b, n, width in VGG16_BLOCKS:
      if b > 1:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for i in range(1, n + 1):
        h = nn.relu(partitioned.conv(width // self.width_divisor, 3, name=f"conv{b}_{i}")(h))
      fx, fy = jnp.split(_unit_normalize(h), 2)
      lin = self.param(
        f"lin{b - 1}",
        nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        (h.shape[-1],),
      )
      distance += jnp.mean(jnp.sum(lin * jnp.square(fx - fy), axis=-1), axis=(1, 2))
    return distance


def _unit_normalize(features, eps: float = 1e-10):
  return features / (jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True)) + eps)


def load_lpips(path: str) -> tuple[LPIPS, dict]:
  """(module, params) from a file written by `md_jax.tools.convert_lpips`; checks every key."""
  try:
    flat = load_file(path)
  except FileNotFoundError:
    raise FileNotFoundError(
      f"LPIPS weights {path!r} not found: convert the VGG16/LPIPS weights once with "
      "`python -m md_jax.tools.convert_lpips` (see its docstring)"
    ) from None
  if "conv1_1.kernel" not in flat:
    raise ValueError(f"{path}: no 'conv1_1.kernel' — not an LPIPS file from convert_lpips")
  module = LPIPS(width_divisor=64 // flat["conv1_1.kernel"].shape[-1])
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), image, image)["params"])
  expected = {}
  for name, leaf in abstract.items():
    if isinstance(leaf, dict):
      expected.update({f"{name}.{k}": v.shape for k, v in leaf.items()})
    else:
      expected[name] = leaf.shape
  problems = [f"missing {k}" for k in expected if k not in flat]
  problems += [f"unexpected {k}" for k in flat if k not in expected]
  problems += [
    f"{k} has shape {flat[k].shape}, expected {expected[k]}"
    for k in expected
    if k in flat and flat[k].shape != expected[k]
  ]
  if problems:
    raise ValueError(f"{path}: " + "; ".join(problems[:6]))
  params = {}
  for key, value in flat.items():
    name, _, leaf = key.partition(".")
    if leaf:
      params.setdefault(name, {})[leaf] = value.astype(np.float32)
    else:
      params[name] = value.astype(np.float32)
  return module, params

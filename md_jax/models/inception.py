"""The FID feature network: pytorch-fid's InceptionV3 (`pytorch_fid.inception.fid_inception_v3`).

FID numbers are only comparable when computed on the same network, so this is exactly the one
pytorch-fid (and, through its TF port, clean-fid and the original TF FID) uses: torchvision's
Inception3 with the FID patches — the A, C and first E blocks average-pool without counting the
zero padding (TensorFlow's pooling), the last E block max-pools in its pool branch — and the 2048-d
pool3 features (global average after Mixed_7c). Each conv is PyTorch's `BasicConv2d`: conv without
bias, BatchNorm (eps 1e-3) with frozen running statistics, ReLU. Inference only: the BatchNorm
statistics are ordinary (frozen) params, so one `{"params": ...}` tree holds everything.

Weights come from one local safetensors file holding pytorch-fid's state dict unchanged (its keys,
PyTorch's OIHW layout), written once by `md_jax.tools.convert_inception`; `load_inception` maps
`Mixed_5b.branch1x1.conv.weight` → `Mixed_5b/branch1x1/conv/kernel` (HWIO) and `….bn.weight`,
`bias`, `running_mean`, `running_var` → `bn/scale`, `bias`, `mean`, `var`. Nothing is downloaded.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from md_jax.models import cpu_conv, partitioned

FEATURE_DIM = 2048
IMAGE_SIZE = 299
_BN_EPS = 1e-3
# Flax leaf ← PyTorch BatchNorm buffer/parameter name.
_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# In the state dict but not in the feature network: the 1008-way classifier and BN's counters.
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")


def _pair(value):
  return tuple(value) if isinstance(value, tuple | list) else (value, value)


class FrozenBatchNorm(nn.Module):
  """BatchNorm at inference: y = (x − mean) / sqrt(var + eps) · scale + bias, all four frozen."""

  eps: float = _BN_EPS

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    init = {"scale": nn.initializers.ones_init(), "bias": nn.initializers.zeros_init()}
    init |= {"mean": nn.initializers.zeros_init(), "var": nn.initializers.ones_init()}
    p = {
      name: self.param(name, nn.with_logical_partitioning(fn, ("mlp",)), (width,))
      for name, fn in init.items()
    }
    return (x - p["mean"]) * (p["scale"] * jax.lax.rsqrt(p["var"] + self.eps)) + p["bias"]


class BasicConv2d(nn.Module):
  """torchvision's `BasicConv2d`: conv (no bias) → BatchNorm(eps=1e-3) → ReLU."""

  features: int
  kernel_size: int | tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel_size),
      strides=_pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      # TPUs would otherwise multiply f32 in bf16 passes; FID is sensitive to feature error.
      precision=jax.lax.Precision.HIGHEST,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), partitioned.CONV_KERNEL_AXES
      ),
      conv_general_dilated=cpu_conv.conv_general_dilated,
      name="conv",
    )(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x):
  # TensorFlow's 3×3 average pool: the zero padding is not counted (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
  """`max_pool`: FIDInceptionE_2 (Mixed_7c) max-pools in its pool branch — a quirk of the TF
  graph the FID weights come from, kept because the weights were trained through it."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Images (B, 299, 299, 3), float in [0, 255] → pool3 features (B, 2048)."""

  @nn.compact
  def __call__(self, images):
    # pytorch-fid's normalize_input=True on images scaled to [0, 1]: 2x − 1.
    x = images.astype(jnp.float32) / 255.0 * 2.0 - 1.0
    x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# The smallest input every stride and valid pool accepts; params do not depend on image size, so
# shapes and random init trace on it rather than on 299×299.
_MIN_IMAGE = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)


@functools.cache
def _abstract_params() -> dict:
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0), _MIN_IMAGE)
  return nn.meta.unbox(abstract["params"])


def random_params(key) -> dict:
  """Randomly initialised params (BN statistics at mean 0, var 1), for runs with no weights."""
  init = jax.jit(lambda k: InceptionV3().init(k, jnp.zeros(_MIN_IMAGE.shape))["params"])
  return nn.meta.unbox(init(key))


def torch_key(path: tuple[str, ...]) -> str:
  """The pytorch-fid state-dict key of a param path ("Mixed_5b", "branch1x1", "conv", "kernel")."""
  *module, leaf = path
  if module[-1] == "conv":
    return ".".join([*module, "weight"])
  return ".".join([*module, _BN_NAMES[leaf]])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  # HWIO kernels are OIHW in PyTorch.
  return (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape


def expected_torch_shapes() -> dict[str, tuple[int, ...]]:
  """Every state-dict key the feature network reads, with its PyTorch shape."""
  leaves = jax.tree_util.tree_flatten_with_path(_abstract_params())[0]
  out = {}
  for key_path, leaf in leaves:
    path = tuple(k.key for k in key_path)
    out[torch_key(path)] = _torch_shape(path, leaf.shape)
  return out


def is_ignored_key(key: str) -> bool:
  """State-dict entries the pool3 features never read (the classifier, BN counters)."""
  return key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


def load_inception(path: str) -> tuple[InceptionV3, dict]:
  """(module, params) from a safetensors file of pytorch-fid's state dict (convert_inception)."""
  try:
    flat = load_file(path)
  except FileNotFoundError:
    raise FileNotFoundError(
      f"FID Inception weights {path!r} not found: convert pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth once with `python -m md_jax.tools.convert_inception`"
    ) from None
  expected = expected_torch_shapes()
  for key, shape in expected.items():
    if key not in flat:
      raise ValueError(f"{path}: missing key {key!r} (expected shape {shape})")
    if tuple(flat[key].shape) != shape:
      raise ValueError(f"{path}: key {key!r} has shape {tuple(flat[key].shape)}, expected {shape}")
  for key in flat:
    if key not in expected and not is_ignored_key(key):
      raise ValueError(f"{path}: unexpected key {key!r} — not pytorch-fid's FID InceptionV3")

  def leaf(key_path, _):
    path_ = tuple(k.key for k in key_path)
    value = np.asarray(flat[torch_key(path_)], np.float32)
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if path_[-1] == "kernel" else value

  return InceptionV3(), jax.tree_util.tree_map_with_path(leaf, _abstract_params())

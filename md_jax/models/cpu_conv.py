"""Convolutions as matmuls on CPUs, where XLA:CPU's own convolution is slow: 1×1 kernels, and 3×3
kernels on small feature maps with many channels.

XLA:CPU splits a convolution over too few threads when the image is small and the channels many
(a UNet's inner levels: 16×16 and less at 640-1280 channels); there, unfolding the k×k
neighbourhoods into the channels (im2col: 9× the input, a few MB) and one matmul runs the forward
pass 1.1-2.7× and forward + backward 1.5-3.8× faster on a 2-core Xeon, and a 1×1 kernel is a plain
matmul (BENCHMARKS.md, 'Faster than diffusers'). At 32×32 and more the convolution is faster and
stays. Same parameters, same function; `cpu_lowering.on_cpu` keeps TPUs, GPUs and the exports on
the convolution. Flax's `nn.Conv` takes `conv_general_dilated` as its `conv_general_dilated`.
"""

import functools

import jax
import jax.numpy as jnp

from md_jax.models import cpu_lowering

# 3×3 convolutions run as matmuls on a CPU on feature maps of at most this many pixels (H·W) with
# at least this many input channels; with fewer channels the convolution is as fast or faster.
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 192


def _as_matmul(lhs, rhs, padding):
  """NHWC input, HWIO kernel, stride 1: the k×k shifted windows side by side in the channels,
  times the kernel as a (k·k·I, O) matrix."""
  kh, kw, _, cout = rhs.shape
  if (kh, kw) == (1, 1):
    return jnp.einsum("bhwc,co->bhwo", lhs, rhs[0, 0])
  padded = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
  out_h = padded.shape[1] - kh + 1
  out_w = padded.shape[2] - kw + 1
  windows = [padded[:, i : i + out_h, j : j + out_w] for i in range(kh) for j in range(kw)]
  return jnp.einsum("bhwk,ko->bhwo", jnp.concatenate(windows, -1), rhs.reshape(-1, cout))


def _runs_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, groups, dims):
  spatial = lhs.ndim == 4 and rhs.ndim == 4
  nhwc_hwio = dims is not None and tuple(map(tuple, dims)) == (
    (0, 3, 1, 2),
    (3, 2, 0, 1),
    (0, 3, 1, 2),
  )
  plain = (
    all(s == 1 for s in window_strides)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and groups == 1
    and not isinstance(padding, str)
  )
  if not (spatial and nhwc_hwio and plain):
    return False
  one_by_one = rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding)
  small_3x3 = rhs.shape[:2] == (3, 3) and lhs.shape[1] * lhs.shape[2] <= IM2COL_MAX_PIXELS
  small_3x3 = small_3x3 and rhs.shape[2] >= IM2COL_MIN_CHANNELS
  return one_by_one or small_3x3


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """`jax.lax.conv_general_dilated`, lowered as a matmul on CPUs where that is faster."""
  plain = functools.partial(
    jax.lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
    **kwargs,
  )
  if kwargs or not _runs_as_matmul(
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count,
    dimension_numbers,
  ):  # fmt: skip
    return plain(lhs, rhs)
  padding = [tuple(p) for p in padding]
  return cpu_lowering.on_cpu(
    lhs, rhs, cpu=lambda x, k: _as_matmul(x, k, padding).astype(x.dtype), default=plain
  )

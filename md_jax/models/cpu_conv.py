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
# In bfloat16 the matmul runs on AMX-BF16 and XLA:CPU's convolution does not (no faster than in
# float32), so im2col pays at any width up to 64×64 maps (2-core Xeon, bf16, ms, conv → matmul:
# 32²×320→320 10.1 → 4.1, 64²×160→160 8.7 → 5.6, 64²×512→512 87 → 66); on larger maps the
# unfolded input (9× a map of 16+ MB) costs more than the convolution.
BF16_IM2COL_MAX_PIXELS = 4096


def _as_matmul(lhs, rhs, padding):
  """NHWC input, HWIO kernel, stride 1: the k×k shifted windows side by side in the channels,
  times the kernel as a (k·k·I, O) matrix."""
  kh, kw, _, cout = rhs.shape
  wider = cpu_lowering.accumulate_in_float32(lhs, rhs)
  if (kh, kw) == (1, 1):
    return jnp.einsum("bhwc,co->bhwo", lhs, rhs[0, 0], **wider)
  return jnp.einsum("bhwk,ko->bhwo", _unfold(lhs, kh, kw, padding), rhs.reshape(-1, cout), **wider)


def _unfold(x, kh, kw, padding):
  """(B, H', W', kh·kw·C): each output pixel's k×k input neighbourhood, window by window.

  16-bit channel pairs are moved as one uint32: XLA:CPU pads and concatenates 16-bit elements
  an order of magnitude slower than 32-bit ones (64²×160: 25 ms against 2.9)."""
  b, h, w, c = x.shape
  dtype = x.dtype
  packed = dtype.itemsize == 2 and c % 2 == 0
  if packed:
    x = jax.lax.bitcast_convert_type(x.reshape(b, h, w, c // 2, 2), jnp.uint32)
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h = padded.shape[1] - kh + 1
  out_w = padded.shape[2] - kw + 1
  windows = [padded[:, i : i + out_h, j : j + out_w] for i in range(kh) for j in range(kw)]
  unfolded = jnp.concatenate(windows, -1)
  if packed:
    unfolded = jax.lax.bitcast_convert_type(unfolded, dtype)
    unfolded = unfolded.reshape(b, out_h, out_w, kh * kw * c)
  return unfolded


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
  if rhs.shape[:2] != (3, 3):
    return one_by_one
  if cpu_lowering.accumulate_in_float32(lhs, rhs):
    return lhs.shape[1] * lhs.shape[2] <= BF16_IM2COL_MAX_PIXELS
  return lhs.shape[1] * lhs.shape[2] <= IM2COL_MAX_PIXELS and rhs.shape[2] >= IM2COL_MIN_CHANNELS


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

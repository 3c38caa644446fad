"""One text-conditioned latent-diffusion UNet, configured as SD-1.5, MobileDiffusion or a tiny toy.

Layout (all per-level tuples run from the outermost, full-resolution level inwards):

  conv_in -> down_0 .. down_{L-2} -> innermost -> up_{L-2} .. up_0 -> GN, swish, conv_out

* `down_i`: for each entry j of `down_transformer_depths[i]`, a conv block (`block_types[i]`) then a
  spatial transformer of that depth (0 = none); then a stride-2 downsample.
* `innermost` (Sec. 3.4): ONE module holding the innermost level's down blocks, the bottleneck
  (conv block, transformer of `mid_transformer_depth`, conv block) and the innermost up blocks plus
  their upsample, because they share one feature-map size and are searched together.
* `up_i`: for each entry of `up_transformer_depths[i]`, concat a skip, conv block, transformer;
  then a nearest ×2 upsample (except at level 0).

Skips follow SD: level i pushes its input and every block output, so each level's up path has one
more block than its down path (checked). `*_self_attention` has the same nested shape as the depths
and turns self-attention off per stack while cross-attention stays (MobileDiffusion Sec. 3.2).

The level modules (`DownLevel`, `UpLevel`, `Innermost`) live in `models/unet_levels.py`.

Build it from a config with `UNet.from_config(config)` (see `configs/models/*.py`); the returned
module is a plain dataclass, `UNet(**fields)` works too. Call it as `unet.apply(variables, x, t,
text_emb)` with x (B, H, W, in_channels) NHWC, t (B,) timesteps, text_emb (B, L, text_dim).

Classifier-free guidance: with `learned_null_text=True` the model owns a zero-initialised
`null_text_emb` parameter of shape (text_length, text_dim). `text_emb=None` runs the unconditional
branch with it, and `drop_text` (B,) bool swaps it in per example (CFG dropout in training);
`null_text_embedding(params, batch)` returns it for samplers that batch cond/uncond themselves.
With `learned_null_text=False` (SD-1.5 parity), pass the text encoder's embedding of "" instead.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned
from md_jax.models.embeddings import TimestepEmbedding
from md_jax.models.unet_levels import BlockOptions, DownLevel, Innermost, UpLevel


def _as_tuples(value):
  """ConfigDicts restored from JSON hold lists; module fields want (nested) tuples."""
  if isinstance(value, list | tuple):
    return tuple(_as_tuples(v) for v in value)
  return value


class UNet(nn.Module):
  in_channels: int = 8
  out_channels: int = 8
  channels: tuple[int, ...] = (320, 640, 1024)
  block_types: tuple[str, ...] = ("resnet", "separable", "separable")
  down_transformer_depths: tuple[tuple[int, ...], ...] = ((0,), (1,), (1,))
  down_self_attention: tuple[tuple[bool, ...], ...] = ((False,), (False,), (True,))
  mid_transformer_depth: int = 1
  mid_self_attention: bool = True
  up_transformer_depths: tuple[tuple[int, ...], ...] = ((0, 0), (1, 1), (1, 1))
  up_self_attention: tuple[tuple[bool, ...], ...] = ((False, False), (False, False), (True, True))
  time_embed_dim: int | None = None  # None: 4 × channels[0], as SD
  norm_groups: int = 32
  separable_expansion: int | tuple[int, ...] = 2  # one for all levels, or one per level
  separable_resample: bool = False
  num_heads: int | None = None
  head_dim: int = 64
  shared_kv: bool = False
  attention_fn: str = "softmax"
  attention_implementation: str = "xla"  # or "cudnn" (GPU): models/attention.py
  ffn_expansion: int = 4
  ffn_activation: str = "gelu"
  text_dim: int = 768
  text_length: int = 77
  learned_null_text: bool = False
  # Global caption conditioning (Imagen, SDXL): the mean of the text tokens, projected, is added
  # to the time embedding, so every conv block sees the whole caption, not only the levels with
  # cross-attention. Off in the paper's layout; the main job's small UNet learns position and
  # shape count sooner with it (BENCHMARKS.md). Under CLIP's causal mask the padding tokens each
  # summarise the whole caption.
  pooled_text: bool = False
  # ADM's scale-shift norm (`conv_blocks.py`): the embedding scales and shifts normalised features.
  # Worse on the main job's budget (0.853 → 0.788; BENCHMARKS.md, session 24); for larger runs.
  scale_shift_norm: bool = False
  # Self-conditioning (Chen et al., 2023, "Analog Bits"): the model's own previous x̂_0 enters
  # beside x_t (channels concatenated; zeros when there is none), so that a sampler's later
  # steps refine what earlier ones committed to instead of re-deciding it from x_t alone.
  self_condition: bool = False
  # Representation alignment (REPA, Yu et al., 2025): > 0 builds a small MLP head on the middle's
  # output (`innermost/representation_{hidden,out}`) whose per-location output, of this width, is
  # sown as `intermediates/innermost/representation`; a training loss aligns it with a frozen
  # encoder's features of the clean image (`training/representation_alignment.py`). Sampling never
  # reads it (XLA drops the unused head), and 0 builds nothing.
  representation_dim: int = 0
  # Guidance-conditioned (Meng et al., 2023): the classifier-free guidance scale w enters as an
  # embedding added to the time embedding (`guidance_embed`, zero-initialised), and the UNet
  # predicts the guided output in one call: what a step-distilled student is
  # (`training/step_distill.py`). Calls then pass `guidance` (B,).
  guidance_embedding: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping, **overrides) -> "UNet":
    """Builds the module from a model ConfigDict; unknown keys fail here (typos never pass)."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {k: _as_tuples(v) for k, v in items.items()}
    fields.update(overrides)
    for key in ("dtype", "param_dtype"):
      if isinstance(fields.get(key), str):
        fields[key] = jnp.dtype(fields[key])
    return cls(**fields)

  def block_options(self, level: int) -> BlockOptions:
    expansion = self.separable_expansion
    if isinstance(expansion, tuple):
      expansion = expansion[level]
    return BlockOptions(
      norm_groups=self.norm_groups,
      separable_expansion=expansion,
      separable_resample=self.separable_resample,
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      shared_kv=self.shared_kv,
      attention_fn=self.attention_fn,
      attention_implementation=self.attention_implementation,
      ffn_expansion=self.ffn_expansion,
      ffn_activation=self.ffn_activation,
      scale_shift_norm=self.scale_shift_norm,
      remat=self.remat,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )

  def check_layout(self) -> None:
    """Raises ValueError on inconsistent per-level tuples (called at trace time)."""
    num_levels = len(self.channels)
    if isinstance(self.separable_expansion, tuple) and len(self.separable_expansion) != num_levels:
      raise ValueError(f"separable_expansion needs one entry per level: {self.separable_expansion}")
    for name in (
      "block_types",
      "down_transformer_depths",
      "down_self_attention",
      "up_transformer_depths",
      "up_self_attention",
    ):
      if len(getattr(self, name)) != num_levels:
        raise ValueError(f"{name} needs one entry per level ({num_levels}): {getattr(self, name)}")
    for i in range(num_levels):
      down, up = self.down_transformer_depths[i], self.up_transformer_depths[i]
      if len(up) != len(down) + 1:
        raise ValueError(
          f"level {i}: the up path needs one block more than the down path (one per skip), "
          f"got {len(down)} down and {len(up)} up"
        )
      if len(self.down_self_attention[i]) != len(down) or len(self.up_self_attention[i]) != len(up):
        raise ValueError(f"level {i}: *_self_attention must have the shape of *_transformer_depths")
    for c in self.channels:
      if c % self.norm_groups:
        raise ValueError(f"channels {c} not divisible by norm_groups={self.norm_groups}")

  @nn.compact
  def __call__(
    self,
    x: jnp.ndarray,
    t: jnp.ndarray,
    text_emb: jnp.ndarray | None,
    *,
    drop_text: jnp.ndarray | None = None,
    train: bool = False,
    features: str | None = None,
    x0_estimate: jnp.ndarray | None = None,
    guidance: jnp.ndarray | None = None,
    adapter_features: tuple[jnp.ndarray, ...] | None = None,
  ) -> jnp.ndarray:
    """Predicts the diffusion target (B, H, W, out_channels), float32.

    `train` is accepted for the stage trainers' uniform call; this UNet has no dropout or
    batch statistics, so it changes nothing. `features` returns an inner map instead, for a
    discriminator built on the UNet (UFOGen): "mid" the encoder and middle's output (the up path
    is never built), "last" the activations before `conv_out`. Parameter names are the same.
    `guidance` (B,) or scalar: the guidance scale of a `guidance_embedding` UNet (required there,
    refused elsewhere).
    `adapter_features`: a control plugin's residuals (`models/control_adapter.py`), one per
    level, each added to that level's input (B, H/2^i, W/2^i, c): conv_in's output at level 0
    (c = channels[0]), the previous level's downsample after (c = channels[i − 1]), so every
    skip of the level carries it too (T2I-Adapter). None changes nothing and builds no parameter.
    """
    if features not in (None, "mid", "last"):
      raise ValueError(f"features={features!r}: expected None, 'mid' or 'last'")
    del train
    self.check_layout()
    num_levels = len(self.channels)
    if x.shape[1] % 2 ** (num_levels - 1) or x.shape[2] % 2 ** (num_levels - 1):
      raise ValueError(f"spatial size {x.shape[1:3]} not divisible by 2^{num_levels - 1}")
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

    context = self._text_context(text_emb, drop_text, x.shape[0])
    temb = TimestepEmbedding(
      self.channels[0], self.time_embed_dim or 4 * self.channels[0], name="time_embed", **kw
    )(jnp.broadcast_to(jnp.asarray(t), (x.shape[0],)))
    if self.pooled_text:
      pooled = jnp.mean(context.astype(jnp.float32), axis=1).astype(self.dtype)
      temb = temb + partitioned.dense(temb.shape[-1], name="pooled_text_proj", **kw)(pooled)
    if self.guidance_embedding:
      if guidance is None:
        raise ValueError("a UNet built with guidance_embedding needs `guidance` (B,)")
      guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (x.shape[0],))
      temb = temb + TimestepEmbedding(
        self.channels[0], temb.shape[-1], input_scale=100.0, zero_init_output=True,
        name="guidance_embed", **kw,
      )(guidance)  # fmt: skip
    elif guidance is not None:
      raise ValueError("guidance given to a UNet built without guidance_embedding")

    if self.self_condition:
      x0_estimate = jnp.zeros_like(x) if x0_estimate is None else x0_estimate
      x = jnp.concatenate([x, x0_estimate.astype(x.dtype)], axis=-1)
    elif x0_estimate is not None:
      raise ValueError("x0_estimate given to a UNet built without self_condition")
    h = partitioned.conv(self.channels[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
    h = partitioned.constrain_image(h)
    add_control = self._control(adapter_features, num_levels)
    level_skips = []
    for i in range(num_levels - 1):
      h = add_control(h, i)
      h, skips = DownLevel(
        self.channels[i],
        self.block_types[i],
        self.down_transformer_depths[i],
        self.down_self_attention[i],
        self.block_options(i),
        name=f"down_{i}",
      )(h, temb, context)
      level_skips.append(skips)
    last = num_levels - 1
    h = add_control(h, last)
    h = Innermost(
      self.channels[last],
      self.block_types[last],
      self.down_transformer_depths[last],
      self.down_self_attention[last],
      self.mid_transformer_depth,
      self.mid_self_attention,
      self.up_transformer_depths[last],
      self.up_self_attention[last],
      upsample=num_levels > 1,
      representation_dim=self.representation_dim,
      opts=self.block_options(last),
      name="innermost",
    )(h, temb, context, stop_after_mid=features == "mid")
    if features == "mid":
      return h
    for i in reversed(range(num_levels - 1)):
      h = UpLevel(
        self.channels[i],
        self.block_types[i],
        self.up_transformer_depths[i],
        self.up_self_attention[i],
        upsample=i > 0,
        opts=self.block_options(i),
        name=f"up_{i}",
      )(h, temb, context, level_skips[i])
    h = nn.swish(partitioned.group_norm(self.norm_groups, name="norm_out", **kw)(h))
    if features == "last":
      return h
    h = partitioned.conv(self.out_channels, 3, zero_init=True, name="conv_out", **kw)(h)
    return h.astype(jnp.float32)

  def _control(self, adapter_features, num_levels):
    """(h, level) → h plus the level's adapter residual (h itself without a plugin)."""
    if adapter_features is None:
      return lambda h, level: h
    if len(adapter_features) != num_levels:
      raise ValueError(
        f"adapter_features has {len(adapter_features)} entries; this UNet has {num_levels} levels"
      )

    def add(h, level):
      feature = adapter_features[level]
      if feature.shape != h.shape:
        raise ValueError(
          f"adapter_features[{level}] is {feature.shape}; level {level}'s input is {h.shape}"
        )
      return h + feature.astype(h.dtype)

    return add

  def _text_context(self, text_emb, drop_text, batch):
    if self.learned_null_text:
      null = self.param(
        "null_text_emb",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("length", "embed")),
        (self.text_length, self.text_dim),
        self.param_dtype,
      )
      null = jnp.broadcast_to(null[None], (batch, *null.shape))
      if text_emb is None:
        text_emb = null
      elif drop_text is not None:
        text_emb = jnp.where(jnp.reshape(drop_text, (-1, 1, 1)), null, text_emb)
    elif text_emb is None or drop_text is not None:
      raise ValueError("text_emb=None / drop_text need learned_null_text=True")
    if text_emb.shape[-1] != self.text_dim:
      raise ValueError(f"text_emb width {text_emb.shape[-1]} != text_dim {self.text_dim}")
    return partitioned.constrain_tokens(text_emb.astype(self.dtype))


def null_text_embedding(params: Mapping, batch: int | None = None) -> jnp.ndarray:
  """The learned null text embedding from a UNet's params, optionally broadcast to a batch."""
  null = nn.meta.unbox(params["null_text_emb"])
  return null if batch is None else jnp.broadcast_to(null[None], (batch, *null.shape))

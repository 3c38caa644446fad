"""Tiny UNet for tests and CPU training on the embedded `shapes` dataset (~0.6M params).

Same module and switches as MobileDiffusion (ResNet outer level, separable innermost unified module,
a CA-only stack and SA+CA stacks with shared K/V, swish GLU ×3), at widths (32, 64), 8 GroupNorm
groups, 64-d text. Works on 4×4 / 8×8 / 16×16 latents (any even size) with the same params.
`tiny.py:pixels` takes 3-channel pixel-space input instead of 8-channel latents.
`tiny.py:three_levels` (~1.6M params) adds a 96-wide third level with self-attention: at 16×16
latents (64 px) two levels' attention sees only 8×8, and where shapes sit relative to each other is
decided across the whole image. Needs latents divisible by 4. The main job uses it with ResNet
blocks at every level (`configs/main.py`).

The module is built with `md_jax.models.unet.UNet.from_config(get_config())`.

  python -m md_jax.tools.model_stats --config=configs/models/tiny.py --latent_size=8
"""

import ml_collections

F, T = False, True


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.in_channels = 8
  c.out_channels = 8
  c.channels = (32, 64)
  c.block_types = ("resnet", "separable")
  c.down_transformer_depths = ((0,), (1,))
  c.down_self_attention = ((F,), (F,))
  c.mid_transformer_depth = 1
  c.mid_self_attention = True
  c.up_transformer_depths = ((0, 0), (1, 1))
  c.up_self_attention = ((F, F), (T, F))
  c.time_embed_dim = 128
  c.norm_groups = 8
  c.separable_expansion = 2
  c.separable_resample = False
  c.num_heads = None
  c.head_dim = 16
  c.shared_kv = True
  c.attention_fn = "softmax"
  c.attention_implementation = "xla"  # "cudnn": fused flash attention on GPUs (bf16)
  c.ffn_expansion = 3
  c.ffn_activation = "swish"
  c.text_dim = 64
  c.text_length = 77
  c.learned_null_text = True
  c.pooled_text = False  # the paper's UNet: text enters through cross-attention only
  c.self_condition = False  # the model's own previous x̂_0 as a second input (models/unet.py)
  c.representation_dim = 0  # > 0: a head for representation alignment (models/unet.py)
  c.scale_shift_norm = False  # the embedding scales and shifts normalised features (ADM)
  c.remat = False
  c.dtype = "float32"
  c.param_dtype = "float32"
  if arg == "pixels":
    c.in_channels = 3
    c.out_channels = 3
  elif arg == "three_levels":
    c.channels = (32, 64, 96)
    c.block_types = ("resnet", "separable", "separable")
    c.down_transformer_depths = ((0,), (1,), (1,))
    c.down_self_attention = ((F,), (F,), (T,))
    c.up_transformer_depths = ((0, 0), (1, 1), (1, 1))
    c.up_self_attention = ((F, F), (F, F), (T, F))
  elif arg not in (None, "latents"):
    raise ValueError(f"tiny.py variants: latents (default), pixels, three_levels; got {arg!r}")
  return c

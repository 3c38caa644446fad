"""Stable Diffusion 1.5 UNet expressed with md_jax's generic UNet (Table 1, row "SD-1.4/1.5").

4 levels (320, 640, 1280, 1280) at 64/32/16/8 latent pixels; 2 ResNet blocks per level on the down
path and 3 on the up path, each followed at the first three levels by a 1-layer transformer
(self-attention + cross-attention + GEGLU ×4); the bottleneck is ResNet + transformer + ResNet.
8 heads at every width, 4 latent channels, 768-d CLIP text. Linear proj_in/proj_out stand in for
SD's 1×1 convs (same parameter count), so the count is exactly diffusers' 859,520,964:

  python -m md_jax.tools.model_stats --config=configs/models/sd15.py

The module is built with `md_jax.models.unet.UNet.from_config(get_config())`.
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.in_channels = 4
  c.out_channels = 4
  c.channels = (320, 640, 1280, 1280)
  c.block_types = ("resnet", "resnet", "resnet", "resnet")
  c.down_transformer_depths = ((1, 1), (1, 1), (1, 1), (0, 0))
  c.down_self_attention = ((True, True), (True, True), (True, True), (False, False))
  c.mid_transformer_depth = 1
  c.mid_self_attention = True
  c.up_transformer_depths = ((1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0))
  c.up_self_attention = ((True,) * 3, (True,) * 3, (True,) * 3, (False,) * 3)
  c.time_embed_dim = 1280
  c.norm_groups = 32
  c.separable_expansion = 1  # unused: no separable blocks
  c.separable_resample = False
  c.num_heads = 8
  c.head_dim = 64  # unused when num_heads is set
  c.shared_kv = False
  c.attention_fn = "softmax"
  c.attention_implementation = "xla"  # "cudnn": fused flash attention on GPUs (bf16)
  c.ffn_expansion = 4
  c.ffn_activation = "gelu"
  c.text_dim = 768
  c.text_length = 77
  c.learned_null_text = False  # SD uses CLIP("") as the unconditional embedding
  c.pooled_text = False
  c.remat = False
  c.dtype = "float32"
  c.param_dtype = "float32"
  return c

"""MobileDiffusion UNet. Paper Table 1: (320, 640, 1024), 11 conv, 15 SA + 18 CA, 386M, 182 GFLOPs.

  python -m md_jax.tools.model_stats --config=configs/models/mobilediffusion.py
  -> 387.7M params, 181.3 GFLOPs (multiply-adds) at a 64×64×8 latent, 11 conv, 15 SA + 18 CA

Built with `md_jax.models.unet.UNet.from_config(get_config())`; tuples stay tuples.

Fixed by the paper (Sec. 3.2-3.4): three levels at 64/32/16 latent pixels; no transformer at 64×64;
no self-attention at 32×32; shared K/V in self-attention; GLU feed-forward with swish and
expansion 3; separable (ConvNeXt-like, Fig. 2) conv blocks everywhere except the outermost level;
one residual block per level on the down path (two on the up path, one per skip, as SD's 2/3)
except the innermost unified module, which holds a down block, the bottleneck (conv, transformer,
conv) and two up blocks. That is 3 + 3 + 5 = 11 conv blocks. 8 latent channels, 768-d CLIP-L
text, head dim 64.

Not printed in the paper, chosen by search (a script over `jax.eval_shape` parameter counts and
XLA cost analysis of the jitted forward, scoring max(|params/386M - 1|, |GFLOPs/182 - 1|)):

* the 3 CA-only layers: one after each of the three 32×32 conv blocks (down, up, up). Moving one
  or two of them into an "outer" 16×16 stack (the paper's wording also names one) adds ~7.6M
  params per layer (1024 wide) and lowers FLOPs; no such layout came within 1.3% of both numbers.
* the 15 full (SA+CA) layers: all at 16×16, a 9-layer bottleneck stack plus a 6-layer stack
  after the first innermost up block ("inner 16×16 stack"); the innermost down block and the last
  innermost up block carry no transformer. The 9/6 split changes neither params nor FLOPs; each
  extra transformer stack costs 2.1M params (proj_in/proj_out) and 0.55 GFLOPs.
* separable block expansion (pointwise C_in -> e·C_out -> C_out): 8 at 32×32 and 4 at 16×16.
  Its FLOPs per parameter is ~1 G/M at 32×32 and ~0.26 G/M at 16×16, and the transformer layers
  fixed above leave exactly that mix to fill: uniform e=4 gives 379M / 170 GFLOPs, uniform e=6
  409M / 182.
* resample convs are plain 3×3 (the upsample into 64×64 alone is 15 GFLOPs; separable
  resampling drops the model to ~160 GFLOPs).

Other candidates (params M / GFLOPs): 2+9+2+2 full-layer split with e=(8, 4) 391.9/182.3;
e=(10, 3) 382.1/184.6; CA at 32×32 down+up plus the outer 16×16 up stack, e=(10, 3) 391.0/182.6.
"""

import ml_collections

F, T = False, True


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.in_channels = 8
  c.out_channels = 8
  c.channels = (320, 640, 1024)
  c.block_types = ("resnet", "separable", "separable")
  # One entry per residual block: depth of the transformer after it (0 = none).
  c.down_transformer_depths = ((0,), (1,), (0,))
  c.down_self_attention = ((F,), (F,), (F,))
  c.mid_transformer_depth = 9
  c.mid_self_attention = True
  c.up_transformer_depths = ((0, 0), (1, 1), (6, 0))
  c.up_self_attention = ((F, F), (F, F), (T, F))
  c.time_embed_dim = 1280
  c.norm_groups = 32
  c.separable_expansion = (4, 8, 4)  # per level; level 0 is ResNet and ignores it
  c.separable_resample = False
  c.num_heads = None
  c.head_dim = 64
  c.shared_kv = True
  c.attention_fn = "softmax"  # "relu" after the Sec. 3.2 finetune (relu_finetune stage)
  c.attention_implementation = "xla"  # "cudnn": fused flash attention on GPUs (bf16)
  c.ffn_expansion = 3
  c.ffn_activation = "swish"
  c.text_dim = 768
  c.text_length = 77
  c.learned_null_text = True
  c.pooled_text = False  # the paper's UNet: text enters through cross-attention only
  c.self_condition = False  # the model's own previous x̂_0 as a second input (models/unet.py)
  c.representation_dim = 0  # > 0: a head for representation alignment (models/unet.py)
  c.scale_shift_norm = False  # the embedding scales and shifts normalised features (ADM)
  c.remat = False
  c.dtype = "float32"
  c.param_dtype = "float32"
  return c

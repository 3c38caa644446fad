"""MobileDiffusion UNet. Paper Table 1: (320, 640, 1024), 11 conv, 15 SA + 18 CA, 386M, 182 GFLOPs.

  python -m md_jax.tools.model_stats --config=configs/models/mobilediffusion.py
  -> 387.7M params, 181.3 GFLOPs (multiply-adds) at a 64×64×8 latent, 11 conv, 15 SA + 18 CA

Built with `md_jax.models.unet.UNet.from_config(get_config())`; tuples stay tuples.

As the paper fixes it (Sec. 3.2-3.4): three levels at 64/32/16 latent pixels; no transformer at
64×64 and no self-attention at 32×32; shared K/V; swish GLU feed-forward ×3; separable
(ConvNeXt-like, Fig. 2) conv blocks except at the outermost level; one residual block per level
down and two up, except the innermost unified module (a down block, the conv-transformer-conv
bottleneck, two up blocks): 3 + 3 + 5 = 11 conv blocks. Where the paper is silent, a search on
parameter and FLOP counts chose: the 3 CA-only layers after the three 32×32 conv blocks; the 15
SA+CA layers at 16×16, 9 in the bottleneck and 6 after the first innermost up block; separable
expansion 8 at 32×32 and 4 at 16×16; plain 3×3 resample convs (BENCHMARKS.md, 'Recipe history',
has the search and the layouts it rejected).
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

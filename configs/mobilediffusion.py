"""MobileDiffusion pretraining, the paper's recipe (Sec. 5.1) at full size, for TPU pods.

    python -m md_jax.main --config=configs/mobilediffusion.py --workdir=gs://BUCKET/md \
        --config.data.dataset=YOUR_TFDS_DATASET --config.text_encoder.path=/path/to/clip-vit-l-14
    python launch/aot_compile.py --config=configs/mobilediffusion.py --topology=v5e:16x16

The CLIP directory gives the text encoder and its tokenizer (its `vocab.json`, `merges.txt`; a
vocabulary that is not the encoder's, or a width that is not `model.text_dim`, is one error before
anything compiles).

386M-parameter UNet (Table 1), frozen CLIP ViT-L/14, 8-channel latents; AdamW lr 1e-3, β (0.9,
0.999), weight decay 0.01; 750K steps at 256 px with global batch 4096, then 250K at 512 px with
2048. bf16 compute with float32 params; FSDP over 16 chips of each data-parallel group.

On GPUs add `--config.model.attention_implementation=cudnn` (fused flash attention) and
`XLA_FLAGS=--xla_gpu_enable_triton_gemm=false` (cuBLAS GEMMs): with both, the 256 px step reaches
41 % of an H100's bf16 peak in model FLOPs at batch 512 per GPU (BENCHMARKS.md, 'Train-step
efficiency').
"""

from md_jax.config_utils import load_config


def get_config(arg=None):
  config = load_config("diffusion.py", relative_to=__file__)
  config.model = load_config("models/mobilediffusion.py", relative_to=__file__)
  config.model.dtype = "bfloat16"
  config.text_encoder.dtype = "bfloat16"
  config.model.text_dim = config.text_encoder.hidden_size
  config.progressive.resolutions = (256, 512)
  config.progressive.batch_sizes = (4096, 2048)
  config.progressive.steps = (750_000, 250_000)
  config.mesh.data, config.mesh.fsdp = -1, 16
  if arg is not None:
    raise ValueError(f"configs/mobilediffusion.py takes no variant, got {arg!r}")
  return config

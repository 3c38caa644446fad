"""MobileDiffusion pretraining, the paper's recipe (Sec. 5.1) at full size, for TPU pods.

    python -m md_jax.main --config=configs/mobilediffusion.py --workdir=gs://BUCKET/md \
        --config.data.dataset=YOUR_TFDS_DATASET --config.text_encoder.path=/path/to/clip-vit-l-14 \
        --config.latents.checkpoint=gs://BUCKET/vae_light   # a vae or decoder_distill run
    python launch/aot_compile.py --config=configs/mobilediffusion.py --topology=v5e:16x16

It trains on a VAE run's latents (`configs/vae.py`, then `configs/decoder_distill.py` for the light
decoder): `config.latents.checkpoint` is required, and a run without it stops in one line before
anything compiles. The AOT compile needs no VAE run: it compiles the step with `latents.vae_model`'s
architecture (encoder included) at random weights. `:smoke` keeps every full-size shape, on
`shapes` captions and that untrained VAE, with nothing to download: `tests/test_config.py` traces
its step (`jax.eval_shape`, nothing allocated) so this file cannot rot.

With the VAE encoder and CLIP frozen, their outputs can be computed once: `python -m
md_jax.cache_latents` with the same flags and `--out=DIR`, then `--config.latents.cached=DIR` runs
the UNet alone each step (`launch/aot_compile.py --cached_latents` compiles that step).

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
  # The paper's autoencoder (Sec. 3.5): 8 latent channels, f = 8, from a vae run (required).
  config.latents.kind = "vae"
  config.latents.checkpoint = ""
  config.latents.vae_model = load_config("models/vae.py", relative_to=__file__)
  if arg == "smoke":
    config.latents.kind = "untrained_vae"
    config.data.dataset = "shapes/r256"
    config.progressive.batch_sizes = (8, 8)  # one example per device of an 8-device host
    config.global_batch_size = 8
    config.mesh.data, config.mesh.fsdp = -1, 1
  elif arg is not None:
    raise ValueError(f"configs/mobilediffusion.py: unknown variant {arg!r} (known: smoke)")
  return config

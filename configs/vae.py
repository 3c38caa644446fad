"""Stage `vae`: the f=8, c=8 autoencoder with L2 + KL + LPIPS + PatchGAN losses (paper Sec. 3.5).

    python -m md_jax.main --config=configs/vae.py --workdir=WORKDIR \
        --config.perceptual.weights=/data/lpips_vgg16.safetensors --config.data.dataset=...
    python -m md_jax.main --config=configs/vae.py:tiny --workdir=workdirs/vae_tiny   # shapes, CPU
    python launch/aot_compile.py --config=configs/vae.py --topology=v5e:4x4 \
        --config.perceptual.weights=/data/lpips_vgg16.safetensors        # memory for a slice
    python -m md_jax.evaluation.vae_eval --checkpoint=workdirs/vae_tiny

The paper trains with batch 256 for 2M iterations. LPIPS needs VGG16/LPIPS weights converted once
to a local file (`python -m md_jax.tools.convert_lpips`, see its docstring); without them the
full-size config stops with an error naming `config.perceptual.weights`.
"""

import ml_collections

from md_jax.config_utils import load_config


def get_config(arg=None):
  config = load_config("data.py", relative_to=__file__)
  config.stage = "vae"
  config.seed = 0
  config.model = load_config("models/vae.py", relative_to=__file__)
  config.data.resolution = 256
  config.data.random_crop = True
  config.global_batch_size = 256
  config.num_train_steps = 2_000_000

  config.kl_weight = 1e-6  # SD's weight for a KL summed over latents / pixels (see training/vae.py)
  config.perceptual = ml_collections.ConfigDict({"weight": 1.0, "weights": ""})
  # > 0: EQ-VAE's equivariance term (Kouzelis et al., 2025) — the latent, average-pooled 2× and
  # turned a random multiple of 90°, must decode to the image pooled and turned the same way —
  # at this weight beside the L2 term; 0 (the paper's VAE) leaves it out. See training/vae.py.
  config.equivariance_weight = 0.0
  # > 0: the decoder is trained on noised latents, z + τ·std(z)·ε with τ ~ U(0, latent_noise)
  # (l-DeTok, Yang et al., 2025), so the encoder must write what matters in a form that survives
  # noise, as a diffusion model's x_t must. 0 (the paper's VAE) decodes the sampled latent only.
  config.latent_noise = 0.0
  config.gan = ml_collections.ConfigDict()
  config.gan.weight = 0.5
  config.gan.start_step = 50_001  # taming/SD: the discriminator joins after the AE has converged
  config.gan.loss = "hinge"  # "hinge" | "non_saturating"
  config.gan.adaptive_weight = True
  config.gan.discriminator = ml_collections.ConfigDict(
    {"channels": 64, "num_layers": 3, "num_groups": 32}
  )
  config.gan.optimizer = ml_collections.ConfigDict(
    {"name": "adam", "lr": 1e-4, "b1": 0.5, "b2": 0.9, "warmup_steps": 0, "grad_clip": 0.0}
  )
  config.optimizer = ml_collections.ConfigDict(
    {"name": "adam", "lr": 1e-4, "b1": 0.5, "b2": 0.9, "warmup_steps": 1000, "grad_clip": 1.0}
  )
  config.ema_decay = 0.999
  config.eval_ema = False  # reconstructions, latent std and later stages use the raw params
  config.latent_std_batches = 16  # training batches the final latent std is measured on

  config.init_checkpoint = ""
  config.checkpoint_every = 5000
  config.max_checkpoints_to_keep = 3
  # Resume from this step instead of the newest (newer ones are set aside as <step>.superseded).
  config.restore_step = ml_collections.config_dict.placeholder(int)
  config.log_every = 100
  config.sample_every = 5000  # originals above reconstructions, to TensorBoard and PNG
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "dcn_data": 1})

  if arg == "tiny":
    config.model = load_config("models/vae.py:tiny", relative_to=__file__)
    config.data.dataset = "shapes/r64"
    config.data.resolution = 64
    config.data.random_crop = False
    config.global_batch_size = 8
    config.num_train_steps = 3000
    # No VGG16 weights can be fetched here; shapes' flat colours and sharp edges are what an L2 +
    # PatchGAN objective already reconstructs. Point `perceptual.weights` at a file to turn it on.
    config.perceptual.weight = 0.0
    config.gan.weight = 0.1
    config.gan.start_step = 1500
    config.gan.discriminator.channels = 32
    config.gan.discriminator.num_groups = 8
    config.optimizer.lr = 4e-4
    config.optimizer.warmup_steps = 100
    config.gan.optimizer.lr = 2e-4
    config.latent_std_batches = 8
    config.checkpoint_every = 500
    config.log_every = 25
    config.sample_every = 500
    config.report_every_secs = 30
  elif arg == "smoke":
    # Every full-size shape (model, discriminator, LPIPS, 256 px) on `shapes` data, one example per
    # device of an 8-device host: tests/test_config.py traces its step with nothing allocated.
    config.data.dataset = "shapes/r256"
    config.global_batch_size = 8
  elif arg is not None:
    raise ValueError(f"configs/vae.py: unknown variant {arg!r} (known: tiny, smoke)")
  return config

"""Latent diffusion pretraining (paper Sec. 5.1) — the tiny variant runs on `shapes` on a CPU.

    python -m md_jax.main --config=configs/diffusion.py:tiny --workdir=workdirs/diffusion_tiny
    python -m md_jax.main --config=configs/diffusion.py:tiny --workdir=... --config.total_steps=20

`configs/mobilediffusion.py` is the paper's full-size recipe built on this file.
A later run in the same workdir with a larger `total_steps` continues where the last one stopped.
"""

import ml_collections

from md_jax.config_utils import load_config
from md_jax.evaluation import periodic
from md_jax.infra import sharding


def get_config(arg=None):
  config = load_config("data.py", relative_to=__file__)
  config.stage = "diffusion"
  config.seed = 0
  config.model = load_config("models/mobilediffusion.py", relative_to=__file__)

  # Progressive resolution (Sec. 5.1): one entry per phase; steps are per phase.
  config.progressive = ml_collections.ConfigDict()
  config.progressive.resolutions = (256, 512)
  config.progressive.batch_sizes = (4096, 2048)
  config.progressive.steps = (750_000, 250_000)
  config.total_steps = -1  # > 0 caps the run (across phases) at this global step
  config.num_train_steps = -1  # used only without `progressive`
  config.global_batch_size = config.progressive.batch_sizes[0]
  config.data.resolution = config.progressive.resolutions[0]
  config.data.random_crop = True

  config.text_encoder = ml_collections.ConfigDict()
  # A local Hugging Face CLIP directory (config.json + model.safetensors); "" = random-init, frozen.
  config.text_encoder.path = ""
  config.text_encoder.hidden_size = 768
  config.text_encoder.intermediate_size = 3072
  config.text_encoder.num_layers = 12
  config.text_encoder.num_heads = 12
  config.text_encoder.dtype = "float32"
  # Optimise the text encoder with the UNet (own EMA): for a random init with no CLIP to keep.
  config.text_encoder.train = False

  config.latents = ml_collections.ConfigDict()
  config.latents.kind = "projection"  # "pixels" | "projection" | "vae" (+ latents.checkpoint)
  config.latents.downsample = 8
  config.latents.channels = 8
  config.latents.scale = 0.0  # 0: 1/std measured by the vae stage ("vae"), 1 otherwise
  config.latents.checkpoint = ""  # "vae": a vae or decoder_distill workdir (light decoder)
  # A `python -m md_jax.cache_latents` directory: train on its precomputed latents and text
  # states instead of encoding images and captions every step (frozen text encoder only).
  config.latents.cached = ""

  config.schedule = ml_collections.ConfigDict({"kind": "scaled_linear", "num_steps": 1000})
  config.prediction = "eps"  # "eps" | "v"
  # Training timestep density: "uniform", or "logit_normal" (SD3) around sigmoid(logit_mean)·T.
  config.timesteps = ml_collections.ConfigDict(
    {"kind": "uniform", "logit_mean": 0.0, "logit_std": 1.0}
  )
  config.min_snr_gamma = 0.0  # > 0 turns on min-SNR-γ weighting (5.0 is the usual choice)
  config.condition_dropout = 0.1  # share of captions replaced by "" for classifier-free guidance
  # Representation alignment (REPA; `md_jax/training/representation_alignment.py`): the UNet's
  # middle, through a head of `model.representation_dim` (the classifier's last width), is pulled
  # toward a frozen `latent_classifier` run's map of the clean latent, at this weight (0: none).
  # Applies in the phases at the classifier's resolution (`every_phase`: in all); needs no labels.
  # `configs/main.py` uses weight 2 in both phases (BENCHMARKS.md, 'Recipe history').
  config.representation_alignment = ml_collections.ConfigDict(
    {"checkpoint": "", "weight": 0.0, "every_phase": False}
  )

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.01
  config.optimizer.warmup_steps = 10_000
  config.optimizer.decay = "constant"
  config.optimizer.decay_steps = 0
  config.optimizer.grad_clip = 1.0
  config.ema_decay = 0.9999

  config.init_checkpoint = ""  # a workdir or checkpoint directory of another stage
  config.init_from_ema = True
  config.checkpoint_every = 5000
  config.max_checkpoints_to_keep = 3
  # Resume from this step instead of the newest (newer ones are set aside as <step>.superseded).
  config.restore_step = ml_collections.config_dict.placeholder(int)
  config.log_every = 100
  config.sample_every = 0  # > 0: a grid of DDIM samples (EMA params) to TensorBoard and PNG
  config.sample_steps = 25
  config.sample_cfg = 3.0
  # FID / CLIP score (`t2i`) and shapes attribute accuracy (`shapes`) while training, each off
  # until its `every` is set (md_jax/evaluation/periodic.py), e.g. the paper's comparison at
  # 30K steps: --config.evals.fid.every=30000 --config.evals.fid.num=30000
  # --config.evals.fid.fid_weights=/data/fid_inception.safetensors --config.evals.fid.clip=DIR
  config.evals = periodic.default_evals()
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "dcn_data": 1})
  config.logical_axis_rules = sharding.DEFAULT_LOGICAL_AXIS_RULES

  if arg == "tiny":
    config.model = load_config("models/tiny.py", relative_to=__file__)
    config.data.dataset = "shapes/r64"
    config.data.random_crop = False
    config.progressive.resolutions = (32, 64)
    config.progressive.batch_sizes = (32, 16)
    config.progressive.steps = (300, 100)
    config.global_batch_size = 32
    config.data.resolution = 32
    config.text_encoder.hidden_size = 64
    config.text_encoder.intermediate_size = 128
    config.text_encoder.num_layers = 2
    config.text_encoder.num_heads = 4
    config.latents.downsample = 4  # 32 px → 8×8×8 latents, 64 px → 16×16×8
    config.optimizer.warmup_steps = 20
    config.ema_decay = 0.99
    config.checkpoint_every = 100
    config.sample_every = 200
    config.log_every = 10
    config.report_every_secs = 10
  elif arg is not None:
    raise ValueError(f"configs/diffusion.py: unknown variant {arg!r} (known: tiny)")
  config.model.text_dim = config.text_encoder.hidden_size
  return config

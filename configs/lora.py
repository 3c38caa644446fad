"""Stage `lora`: DreamBooth-LoRA personalization of a frozen diffusion run (paper Sec. 5.4).

    python -m md_jax.main --config=configs/lora.py:tiny --workdir=workdirs/lora_tiny \
        --config.init_checkpoint=workdirs/diffusion_tiny
    python -m md_jax.main --config=configs/lora.py:tiny,base=workdirs/main/diffusion \
        --workdir=workdirs/lora --config.lora.export=workdirs/lora/lora.safetensors
    python -m md_jax.tools.export_lora --workdir=workdirs/lora --out=concept.safetensors

LoRA factors (rank `lora.rank`) on the base UNet's attention q/k/v/out and transformer projection
kernels learn a concept the `shapes` data never holds (`data/concept.py`: `lora.num_images`
rendered bars or hexagons, captioned with the token `lora.token` where the kind goes) with the
base's diffusion loss; the UNet, text encoder and autoencoder are the diffusion run's
(`config.init_checkpoint`, its EMA), frozen. `lora.prior_weight` > 0 adds DreamBooth's prior
preservation on the base data (`config.data`). Model, text encoder, latent space, schedule and
prediction must be that run's: this file extends `configs/diffusion.py[:tiny]`, and the variant
`base=RUN` takes them from RUN's saved config (e.g. the main job's diffusion stage) and sets
`init_checkpoint` to it. The file applies to the run's one-step UFOGen generator unchanged.
"""

import ml_collections

from md_jax.config_utils import inherit_from_diffusion, load_config

# Attention query/key/value/out (self- and cross-) and the transformer blocks' projections.
DEFAULT_TARGETS = (
  r"(self|cross)_attn/(query|key|value|key_value|out)/kernel$",
  r"transformer[^/]*/proj_(in|out)/kernel$",
)


def get_config(arg=None):
  options = [a for a in (arg or "").split(",") if a]
  tiny = "tiny" in options
  base = [a.split("=", 1)[1] for a in options if a.startswith("base=")]
  unknown = [a for a in options if a != "tiny" and not a.startswith("base=")]
  if unknown or len(base) > 1:
    raise ValueError(f"configs/lora.py: unknown variant {arg!r} (known: tiny, base=RUN)")
  config = load_config("diffusion.py:tiny" if tiny else "diffusion.py", relative_to=__file__)
  config.stage = "lora"
  # One phase at the diffusion run's final resolution.
  config.progressive.resolutions = config.progressive.batch_sizes = config.progressive.steps = ()
  config.data.resolution = 64 if tiny else 512
  config.global_batch_size = 8 if tiny else 64  # the prior (base data) batch
  config.num_train_steps = 800 if tiny else 2000
  config.text_encoder.train = False  # frozen here, whatever the diffusion run did
  del config.representation_alignment  # the base's loss term, not the LoRA's

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 4
  config.lora.alpha = 4.0
  config.lora.targets = DEFAULT_TARGETS  # regexes on the '/'-joined UNet param path
  # A `shapes_scene.EXTRA_KINDS` kind. The bar: a 64 px model rounds a hexagon's corners, which
  # are all that tell it from a circle (BENCHMARKS.md, 'LoRA personalization').
  config.lora.kind = "bar"
  config.lora.token = "sks"  # the rare word bound to it
  config.lora.num_images = 32  # the concept set (DreamBooth: a handful; ≤ 64)
  config.lora.seed = 0  # of the concept set; an evaluation uses another
  config.lora.batch_size = 16  # concept examples per step
  config.lora.prior_weight = 1.0  # DreamBooth's prior preservation on config.data; 0: none
  config.lora.export = ""  # a .safetensors path the last step writes the EMA factors to
  # Pivotal tuning: the token's own embedding rows train with the factors. `sks` is three byte
  # pieces no `shapes` caption uses, random vectors to the base; trained, the main job's one-step
  # G draws the concept half as often again (0.27 at the factors-only run's last checkpoint;
  # 0.41 on the mean of a pivotal run's last five; BENCHMARKS.md, 'pivotal tuning', 'how far the
  # last checkpoint moves').
  config.lora.train_token = True
  # A one-step generator reads the UNet only at t = T−1, and the LoRA moves it only as far as it
  # was trained there: the batch leans to t ≈ T (median 0.92 T; a third above 0.95 T). On the
  # main job it draws the concept in one step three times as often as the control plugin's
  # density (median 0.73 T), at some cost to the 50-step teacher (BENCHMARKS.md).
  config.timesteps.kind = "logit_normal"
  config.timesteps.logit_mean = 2.5
  config.timesteps.logit_std = 1.0

  config.optimizer.lr = 1e-4
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.0
  config.ema_decay = 0.99
  config.checkpoint_every = 1000
  config.sample_every = 0
  config.init_checkpoint = ""  # required: the diffusion run (workdir or checkpoint)
  if tiny:
    config.optimizer.lr = 2e-3
    config.optimizer.warmup_steps = 20
    config.ema_decay = 0.9
    config.checkpoint_every = 200
    config.log_every = 25
  if base:
    from md_jax.infra import checkpoints

    saved = ml_collections.ConfigDict(checkpoints.saved_config(base[0]))
    config = inherit_from_diffusion(config, saved)
    config.init_checkpoint = base[0]
  return config

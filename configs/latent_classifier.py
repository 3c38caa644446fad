"""Stage `latent_classifier`: the noise-aware attribute classifier that guides `shapes` sampling.

    python -m md_jax.main --config=configs/latent_classifier.py \
        --config.latents.checkpoint=RUN/decoder_distill --workdir=RUN/latent_classifier
    python -m md_jax.main --config=configs/latent_classifier.py:tiny --workdir=/tmp/lc  # tests

The data and labels are the evaluator's (`configs/shapes_classifier.py`); `latents` and
`schedule` must be the diffusion run's, the one it guides (`load_guide` checks).
"""

import ml_collections

from md_jax.config_utils import load_config


def get_config(arg=None):
  if arg not in (None, "tiny"):
    raise ValueError(f"configs/latent_classifier.py: unknown variant {arg!r} (known: tiny)")
  config = load_config(f"shapes_classifier.py{':tiny' if arg else ''}", relative_to=__file__)
  config.stage = "latent_classifier"
  config.global_batch_size = 64
  config.num_train_steps = 6000
  # The diffusion run's latent space and forward process (configs/diffusion.py).
  config.latents = ml_collections.ConfigDict(
    {"kind": "vae", "downsample": 4, "channels": 8, "scale": 0.0, "checkpoint": ""}
  )
  config.schedule = ml_collections.ConfigDict({"kind": "scaled_linear", "num_steps": 1000})
  # Trained on t ≤ this, and guidance stops above it: there the kinds are unreadable.
  config.max_timestep = 799
  # Noisings per image per step: the classifier trains on noise_draws × global_batch_size pairs.
  config.noise_draws = 1
  config.model = ml_collections.ConfigDict(
    {"in_channels": 8, "channels": (32, 64, 128), "blocks_per_level": 2, "time_dim": 128,
     "feature_dim": 256, "num_groups": 8}
  )  # fmt: skip
  config.optimizer.update(
    {"lr": 2e-3, "weight_decay": 0.01, "decay": "cosine", "decay_steps": config.num_train_steps}
  )
  config.ema_decay = 0.999
  config.log_every = 100
  if arg == "tiny":
    config.latents.kind = "projection"  # no VAE run needed: a fixed f=4 projection
    config.global_batch_size = 16
    config.num_train_steps = config.optimizer.decay_steps = 40
    config.optimizer.warmup_steps = 5
    config.model.update(
      {"channels": (8, 16), "blocks_per_level": 1, "time_dim": 16, "feature_dim": 32,
       "num_groups": 4}
    )  # fmt: skip
    config.ema_decay = 0.9
    config.log_every = 10
  return config

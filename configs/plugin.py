"""Stage `plugin`: a control plugin (T2I-Adapter style) on a frozen diffusion run (paper Sec. 5.4).

    python -m md_jax.main --config=configs/plugin.py:tiny --workdir=workdirs/plugin_tiny \
        --config.init_checkpoint=workdirs/diffusion_tiny
    python -m md_jax.main --config=configs/plugin.py:tiny --workdir=... \
        --config.init_checkpoint=... --config.plugin.condition=mask \
        --config.data.conditions='("mask",)'

Only the adapter (`models/control_adapter.py`) trains, with the base model's diffusion loss; the
UNet, text encoder and autoencoder are the diffusion run's (`config.init_checkpoint`, its EMA),
frozen. Model, text encoder, latent space, schedule and prediction must be that run's
(`configs/diffusion.py[:tiny]`, which this file extends; for another layout, e.g. the main job's
diffusion stage, build the config with `training.plugin.config_for_base`). The plugin serves the
run's step-distilled and UFOGen one-step UNets unchanged (`generate(..., control=...)`).
"""

import ml_collections

from md_jax.config_utils import load_config


def get_config(arg=None):
  if arg not in (None, "tiny"):
    raise ValueError(f"configs/plugin.py: unknown variant {arg!r} (known: tiny)")
  config = load_config("diffusion.py" if arg is None else "diffusion.py:tiny", relative_to=__file__)
  config.stage = "plugin"
  # One phase at the diffusion run's final resolution.
  config.progressive.resolutions = config.progressive.batch_sizes = config.progressive.steps = ()
  config.data.resolution = 512 if arg is None else 64
  config.global_batch_size = 256 if arg is None else 16
  config.num_train_steps = 20_000 if arg is None else 600
  config.text_encoder.train = False  # frozen here, whatever the diffusion run did
  del config.representation_alignment  # the base's loss term, not the adapter's

  config.plugin = ml_collections.ConfigDict()
  config.plugin.condition = "canny"  # a `data/conditions.py` kind; must be in data.conditions
  config.plugin.width = 1.0  # hidden widths as a fraction of the UNet's per-level widths
  config.plugin.blocks_per_level = 1
  config.data.conditions = (config.plugin.condition,)
  # Structure is decided at high noise, and a one-step generator reads the plugin only at t = T−1:
  # the batch leans toward large t (T2I-Adapter's cubic sampling does the same), median t ≈ 0.73 T.
  config.timesteps.kind = "logit_normal"
  config.timesteps.logit_mean = 1.0
  config.timesteps.logit_std = 1.0

  config.optimizer.lr = 1e-4
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 0.0
  config.ema_decay = 0.999
  config.checkpoint_every = 1000
  config.sample_every = 1000
  config.init_checkpoint = ""  # required: the diffusion run (workdir or checkpoint)
  if arg == "tiny":
    config.optimizer.lr = 1e-3
    config.optimizer.warmup_steps = 20
    config.ema_decay = 0.99
    config.checkpoint_every = 200
    config.sample_every = 0
    config.log_every = 25
  return config

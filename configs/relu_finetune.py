"""Finetune softmax attention into relu attention (paper Sec. 3.2; ~10K iterations).

    python -m md_jax.main --config=configs/relu_finetune.py --workdir=WORKDIR \
        --config.init_checkpoint=DIFFUSION_WORKDIR
    python -m md_jax.main --config=configs/relu_finetune.py:tiny --workdir=... \
        --config.init_checkpoint=workdirs/diffusion_tiny

Restores the softmax model's EMA weights (same parameter shapes: only the attention
nonlinearity changes), a fresh optimizer, and trains at the final resolution.
"""

from md_jax.config_utils import load_config


def get_config(arg=None):
  if arg == "tiny":
    config = load_config("diffusion.py:tiny", relative_to=__file__)
    steps = 100
  elif arg is None:
    config = load_config("mobilediffusion.py", relative_to=__file__)
    steps = 10_000
  else:
    raise ValueError(f"configs/relu_finetune.py: unknown variant {arg!r} (known: tiny)")
  config.stage = "relu_finetune"
  config.model.attention_fn = "relu"
  config.init_checkpoint = ""  # required: the softmax diffusion run's workdir or checkpoint
  # One phase at the pretraining's final resolution and batch size.
  config.progressive.resolutions = config.progressive.resolutions[-1:]
  config.progressive.batch_sizes = config.progressive.batch_sizes[-1:]
  config.progressive.steps = (steps,)
  config.data.resolution = config.progressive.resolutions[0]
  config.global_batch_size = config.progressive.batch_sizes[0]
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
  return config

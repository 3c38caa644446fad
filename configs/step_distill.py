"""Stage `step_distill`: progressive distillation of a diffusion run to few steps, CFG folded in.

    python -m md_jax.main --config=configs/step_distill.py --workdir=WORKDIR \
        --config.init_checkpoint=DIFFUSION_WORKDIR --config.data.dataset=...
    python -m md_jax.main --config=configs/step_distill.py:tiny --workdir=workdirs/distill_tiny \
        --config.init_checkpoint=workdirs/diffusion_tiny
    python -m md_jax.generate --workdir=WORKDIR --steps=8 --cfg=3 --prompt "..."

Salimans & Ho (2022) rounds, 64 → 32 → 16 → 8 steps (one phase each; each round's last
checkpoint kept: `WORKDIR/checkpoints/<round's end step>`), with the teacher's classifier-free
guidance folded into a guidance-conditioned student (Meng et al., 2023; `step_distill.mode`
"cfg_aware" is SnapFusion's loss mix instead). Model, text encoder, latent space, schedule and
prediction must be the diffusion run's (`configs/diffusion.py[:tiny]`, which this file extends);
the student only adds the guidance embedding. `md_jax/training/step_distill.py` has the loss.
"""

import ml_collections

from md_jax.config_utils import load_config


def get_config(arg=None):
  if arg not in (None, "tiny"):
    raise ValueError(f"configs/step_distill.py: unknown variant {arg!r} (known: tiny)")
  config = load_config("diffusion.py" if arg is None else "diffusion.py:tiny", relative_to=__file__)
  config.stage = "step_distill"
  config.text_encoder.train = False  # frozen here, whatever the diffusion run did
  del config.representation_alignment  # the diffusion loss's term; distillation has its own
  # The student takes the guidance scale as input (zero-initialised: it starts as the teacher).
  config.model.guidance_embedding = True
  # Every sampler of this checkpoint steps on the trailing grid the rounds were trained on.
  config.timestep_spacing = "trailing"

  config.step_distill = ml_collections.ConfigDict()
  config.step_distill.teacher_steps = 64  # the diffusion run's DDIM steps the first round halves
  config.step_distill.mode = "embedded"  # | "cfg_aware" (SnapFusion): training/step_distill.py
  # w ~ U[low, high] per example: the scales the student learns to take (Meng et al. draw from
  # [0, 14]; sampling then picks any w in the range).
  config.step_distill.guidance_range = (1.0, 6.0)
  config.step_distill.cfg_aware_probability = 0.5  # "cfg_aware": the share read through CFG

  rounds = 3  # 64 → 32 → 16 → 8
  resolution = 512 if arg is None else 64
  config.progressive.resolutions = (resolution,) * rounds
  config.progressive.batch_sizes = (256,) * rounds if arg is None else (16,) * rounds
  config.progressive.steps = (5000,) * rounds if arg is None else (100,) * rounds
  config.data.resolution = resolution
  config.global_batch_size = config.progressive.batch_sizes[0]
  for entry in config.evals.values():  # periodic evaluations sample at the last round's steps
    entry.steps = config.step_distill.teacher_steps // 2**rounds

  config.optimizer.lr = 1e-5 if arg is None else 1e-4
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.0
  config.optimizer.decay = "constant"
  config.ema_decay = 0.999 if arg is None else 0.99
  config.checkpoint_every = 1000 if arg is None else 100
  config.sample_every = 0
  config.init_checkpoint = ""  # required: the diffusion run (workdir or checkpoint)
  return config

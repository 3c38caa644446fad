"""Stage `ufogen`: one-step diffusion-GAN finetuning of a pretrained diffusion run (paper Sec. 4).

    python -m md_jax.main --config=configs/ufogen.py --workdir=WORKDIR \
        --config.init_checkpoint=DIFFUSION_WORKDIR --config.data.dataset=...
    python -m md_jax.main --config=configs/ufogen.py:tiny --workdir=workdirs/ufogen_tiny \
        --config.init_checkpoint=workdirs/diffusion_tiny
    python -m md_jax.generate --workdir=WORKDIR --sampler=ufogen --steps=1 --prompt "..."

Model, text encoder, latent space, schedule and prediction must be those of the diffusion run
(`configs/diffusion.py[:tiny]`, which this file extends); a mismatch stops the init naming the
leaf. The variants of Table 5 are `ufogen.objective` × `ufogen.lora.rank`. The paper's recipe (and
this default): full finetuning with the diffusion (x0) loss; it converges in < 10K iterations.
"""

import ml_collections

from md_jax.config_utils import load_config


def get_config(arg=None):
  if arg not in (None, "tiny"):
    raise ValueError(f"configs/ufogen.py: unknown variant {arg!r} (known: tiny)")
  config = load_config("diffusion.py" if arg is None else "diffusion.py:tiny", relative_to=__file__)
  config.stage = "ufogen"
  # One phase at the diffusion run's final resolution.
  config.progressive.resolutions = config.progressive.batch_sizes = config.progressive.steps = ()
  config.data.resolution = 512 if arg is None else 64
  config.global_batch_size = 256 if arg is None else 16
  config.num_train_steps = 10_000 if arg is None else 600
  config.text_encoder.train = False  # frozen here, whatever the diffusion run did
  for entry in config.evals.values():  # periodic evaluations: G in one step
    entry.sampler, entry.steps = "ufogen", 1
  # The diffusion loss's REPA term; G's classifier term is `ufogen.classifier`.
  del config.representation_alignment

  config.ufogen = ml_collections.ConfigDict()
  # "diffusion": λ‖x0 − x0′‖² (Eq. 1, the paper's choice); "distill": the frozen pretrained
  # UNet's x0 as target (Eq. 2); "ema_distill": the EMA generator's (Eq. 3; decay `ema_decay`).
  config.ufogen.objective = "diffusion"
  config.ufogen.jump = 250  # t − t′: UFOGen's large denoising jump, T/4 of T = 1000
  config.ufogen.gamma = "constant"  # γ_t: "constant" | "snr" | "alpha" (training/ufogen.py)
  config.ufogen.reconstruction_weight = 1.0  # λ
  config.ufogen.adversarial_weight = 1.0
  config.ufogen.gan_loss = "non_saturating"  # | "hinge"
  config.ufogen.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 8.0})  # rank > 0: LoRA G
  # An auxiliary classifier term (AC-GAN) by a frozen `latent_classifier` run at this weight μ
  # (0: none): its cross-entropy of the caption's attributes on the fake x'_{t'} that D sees. Needs
  # every label key in `data.label_keys`.
  config.ufogen.classifier = ml_collections.ConfigDict({"checkpoint": "", "weight": 0.0})
  config.ufogen.discriminator = ml_collections.ConfigDict()
  config.ufogen.discriminator.features = "mid"  # UNet encoder + middle; "last": the full UNet
  # D's pretrained UNet body learns at this fraction of D's lr, its new head at the full lr: at the
  # full lr the body's Adam steps keep undoing what D learned (`benchmarks/discriminator_probe`;
  # BENCHMARKS.md, 'Recipe history').
  config.ufogen.discriminator.body_lr_scale = 0.1
  # Adam with β1 = 0, as usual for GAN discriminators.
  config.ufogen.discriminator.optimizer = ml_collections.ConfigDict(
    {"name": "adam", "lr": 1e-5, "b1": 0.0, "b2": 0.99, "warmup_steps": 0, "grad_clip": 1.0}
  )

  config.optimizer.lr = 1e-5
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.0
  config.ema_decay = 0.999
  config.checkpoint_every = 1000
  config.sample_every = 1000
  config.init_checkpoint = ""  # required: the diffusion run (workdir or checkpoint)
  if arg == "tiny":
    config.optimizer.lr = 1e-4
    config.ufogen.discriminator.optimizer.lr = 1e-4
    config.ufogen.lora.alpha = 4.0
    config.ema_decay = 0.99
    config.checkpoint_every = 200
    config.sample_every = 200
    config.log_every = 25
  return config

"""Stage `decoder_distill`: the lightweight decoder, encoder frozen (paper Sec. 3.5, SnapFusion).

    python -m md_jax.main --config=configs/decoder_distill.py --workdir=WORKDIR \
        --config.init_checkpoint=VAE_WORKDIR --config.perceptual.weights=...
    python -m md_jax.main --config=configs/decoder_distill.py:tiny --workdir=workdirs/light_tiny \
        --config.init_checkpoint=workdirs/vae_tiny

The encoder (and the full decoder as a teacher, when `distill_weight` > 0) come from the `vae`
checkpoint; `model.light_decoder` is trained without the KL term and with a lower adversarial
weight. The paper trains it for 400K iterations. Its checkpoint carries the vae's latent std.
"""

from md_jax.config_utils import load_config


def get_config(arg=None):
  config = load_config("vae.py" if arg is None else f"vae.py:{arg}", relative_to=__file__)
  config.stage = "decoder_distill"
  config.num_train_steps = 400_000 if arg is None else 1500
  config.kl_weight = 0.0  # not used: the encoder is frozen
  config.gan.weight *= 0.5  # "reduce the weight of adversarial loss"
  config.gan.start_step = 0  # the discriminator comes trained from the vae checkpoint
  # SnapFusion: also match the full decoder's output for the same latents.
  config.distill_weight = 1.0
  # Start the light decoder from the full one's leaves where their shapes agree, else from scratch.
  config.light_decoder_from_full = True
  config.init_checkpoint = ""  # required: the vae run's workdir or checkpoint
  return config

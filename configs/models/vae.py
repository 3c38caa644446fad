"""The autoencoder (paper Sec. 3.5): SD's KL-f8 architecture with c=8 latent channels, and the
lightweight decoder that `decoder_distill` trains (pruned in width and depth).

`:tiny` is the same family at CPU scale for `shapes` (64 px → 8×8×8 latents) and the tests.

  python -m md_jax.benchmarks.decoder_latency            # full vs light decoder, 512 px output
"""

import ml_collections


def _coder(channels, channel_mult, num_res_blocks, mid_attention):
  return ml_collections.ConfigDict(
    {
      "channels": channels,
      "channel_mult": channel_mult,
      "num_res_blocks": num_res_blocks,
      "mid_attention": mid_attention,
    }
  )


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.latent_channels = 8  # c (SD: 4, EMU: 16); f = 2^(len(channel_mult) - 1) = 8
  c.num_groups = 32
  c.dtype = "float32"
  c.encoder = _coder(128, (1, 2, 4, 4), 2, True)
  c.decoder = _coder(128, (1, 2, 4, 4), 3, True)  # SD's decoder: one more block per level
  # Half the width at every level and one block per level instead of three, no mid attention.
  c.light_decoder = _coder(64, (1, 2, 4, 4), 1, False)
  if arg == "tiny":
    c.num_groups = 8
    c.encoder = _coder(32, (1, 2, 2, 4), 1, True)
    c.decoder = _coder(32, (1, 2, 2, 4), 1, True)  # CPU budget: as deep as the encoder
    c.light_decoder = _coder(16, (1, 2, 2, 4), 1, False)
  elif arg is not None:
    raise ValueError(f"configs/models/vae.py: unknown variant {arg!r} (known: tiny)")
  return c

"""Discriminators for the adversarial losses.

`PatchDiscriminator` is the PatchGAN of pix2pix / taming-transformers that SD's VAE is trained
against: 4×4 convs, stride 2 then 1, LeakyReLU(0.2), one logit per overlapping patch (70×70
receptive field with 3 layers). Normalisation is GroupNorm instead of taming's BatchNorm: it has no
running statistics, so the train step stays a pure function, and its output for one image does not
depend on the rest of a (sharded) batch.
"""

import flax.linen as nn
import jax.numpy as jnp

from md_jax.models import partitioned


class PatchDiscriminator(nn.Module):
  channels: int = 64
  num_layers: int = 3
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images (B, H, W, 3) → patch logits (B, H', W', 1)."""
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "padding": 1}
    h = nn.leaky_relu(
      partitioned.conv(self.channels, 4, strides=2, name="conv_0", **kw)(images), 0.2
    )
    for n in range(1, self.num_layers + 1):
      width = self.channels * min(2**n, 8)
      stride = 2 if n < self.num_layers else 1
      h = partitioned.conv(width, 4, strides=stride, name=f"conv_{n}", **kw)(h)
      groups = min(self.num_groups, width)
      norm = partitioned.group_norm(groups, name=f"norm_{n}", dtype=self.dtype,
                                    param_dtype=self.param_dtype)  # fmt: skip
      h = nn.leaky_relu(norm(h), 0.2)
    return partitioned.conv(1, 4, name="logits", **kw)(h).astype(jnp.float32)


def patch_discriminator_from_config(config) -> PatchDiscriminator:
  return PatchDiscriminator(
    channels=config.channels, num_layers=config.num_layers, num_groups=config.num_groups
  )


class UNetDiscriminator(nn.Module):
  """UFOGen's discriminator (paper Sec. 4.1): the diffusion UNet's encoder and middle (or, with
  `features="last"`, the whole UNet up to its output conv) and a head that scores every output
  location and averages the scores into one logit per image.

  It is conditioned on t and the text the way the UNet is (timestep embedding in every ResBlock,
  cross-attention to the text), so it judges x_{t-1} for the caption at that noise level. Its
  `unet` params carry the UNet's names, so the pretrained UNet initialises them
  (`checkpoints.copy_into`); the head's last layer is zero-initialised, so D starts at logit 0
  for every input — neutral, with gradients that come from the body's features.
  """

  unet: nn.Module  # a `UNet`, as `UNet.from_config` builds it
  features: str = "mid"  # "mid": encoder + middle; "last": the full UNet

  @nn.compact
  def __call__(self, x, t, text_emb):
    """x (B, h, w, c) noisy latents at timesteps t (B,), text (B, L, D) → logits (B,)."""
    h = self.unet(x, t, text_emb, features=self.features)
    width = h.shape[-1]
    kw = {"dtype": self.unet.dtype, "param_dtype": self.unet.param_dtype}
    h = partitioned.conv(width, 3, name="head_conv", **kw)(h)
    h = nn.swish(partitioned.group_norm(self.unet.norm_groups, name="head_norm", **kw)(h))
    logits = partitioned.conv(1, 1, zero_init=True, name="head_logits", **kw)(h)
    return jnp.mean(logits.astype(jnp.float32), axis=(1, 2, 3))

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

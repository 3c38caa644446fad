"""The latent autoencoder (paper Sec. 3.5): the SD/LDM "AutoencoderKL" family with f=8, c=8.

    image (H, W, 3) ─Encoder→ moments (H/f, W/f, 2c) → posterior ─sample/mean→ z ─Decoder→ image

f = 2^(len(channel_mult) - 1). Encoder and decoder take their width and depth separately, so the
lightweight decoder of `decoder_distill` (pruned in width and depth, Sec. 3.5) is the same
`Decoder` class with a smaller config, and slots into the same params tree (`{"encoder",
"decoder"}`). Blocks are the UNet's `ResBlock` without a timestep input, a single-head spatial
self-attention in the middle (as SD's VAE; optional), stride-2 convs down and nearest ×2 + conv up.
"""

from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from md_jax.models import partitioned
from md_jax.models.attention import Attention
from md_jax.models.conv_blocks import Downsample, ResBlock, Upsample


class DiagonalGaussian(flax.struct.PyTreeNode):
  """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar)))."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments):
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    # SD's clamp: keeps exp(logvar) finite early in training when the encoder is still wild.
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  def sample(self, key):
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, I)) summed over each example's latent elements: (B,)."""
    terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


class MidBlock(nn.Module):
  """ResBlock → (GN → single-head spatial self-attention, residual) → ResBlock."""

  attention: bool = True
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = {"num_groups": self.num_groups, "dtype": self.dtype, "param_dtype": self.param_dtype}
    b, h, w, c = x.shape
    x = ResBlock(c, name="block_0", **kw)(x)
    if self.attention:
      tokens = partitioned.group_norm(
        self.num_groups, name="attention_norm", dtype=self.dtype, param_dtype=self.param_dtype
      )(x).reshape(b, h * w, c)
      attn = Attention(num_heads=1, head_dim=c, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="attention")  # fmt: skip
      x = x + attn(tokens).reshape(b, h, w, c)
    return ResBlock(c, name="block_1", **kw)(x)


class Encoder(nn.Module):
  """image (B, H, W, 3) in [-1, 1] → posterior moments (B, H/f, W/f, 2·latent_channels)."""

  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  latent_channels: int = 8
  mid_attention: bool = True
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    groups = self.num_groups
    h = partitioned.conv(self.channels * self.channel_mult[0], 3, name="conv_in", **kw)(x)
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, groups, name=f"down_{level}_block_{i}", **kw)(h)
      if level != len(self.channel_mult) - 1:
        h = Downsample(name=f"down_{level}_downsample", **kw)(h)
    h = MidBlock(self.mid_attention, groups, name="mid", **kw)(h)
    h = nn.swish(partitioned.group_norm(groups, name="norm_out", **kw)(h))
    h = partitioned.conv(2 * self.latent_channels, 3, name="conv_out", **kw)(h)
    return partitioned.conv(2 * self.latent_channels, 1, name="quant_conv", **kw)(h)


class Decoder(nn.Module):
  """latents (B, h, w, c) → image (B, h·f, w·f, 3); `num_res_blocks` per level (SD's has 3)."""

  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 3
  mid_attention: bool = True
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    groups = self.num_groups
    z = partitioned.conv(z.shape[-1], 1, name="post_quant_conv", **kw)(z)
    h = partitioned.conv(self.channels * self.channel_mult[-1], 3, name="conv_in", **kw)(z)
    h = MidBlock(self.mid_attention, groups, name="mid", **kw)(h)
    for level in reversed(range(len(self.channel_mult))):
      width = self.channels * self.channel_mult[level]
      for i in range(self.num_res_blocks):
        h = ResBlock(width, groups, name=f"up_{level}_block_{i}", **kw)(h)
      if level != 0:
        h = Upsample(name=f"up_{level}_upsample", **kw)(h)
    h = nn.swish(partitioned.group_norm(groups, name="norm_out", **kw)(h))
    return partitioned.conv(3, 3, name="conv_out", **kw)(h).astype(jnp.float32)


class Autoencoder(nn.Module):
  encoder: Encoder
  decoder: Decoder

  def encode(self, images) -> DiagonalGaussian:
    return DiagonalGaussian.from_moments(self.encoder(images))

  def decode(self, latents):
    return self.decoder(latents)

  def __call__(self, images, key=None):
    """(reconstruction, posterior); `key` samples z from the posterior, None takes its mean."""
    posterior = self.encode(images)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), posterior


def downsample_factor(model_config) -> int:
  return 2 ** (len(model_config.encoder.channel_mult) - 1)


def encoder_from_config(model_config) -> Encoder:
  enc = model_config.encoder
  return Encoder(
    channels=enc.channels,
    channel_mult=tuple(enc.channel_mult),
    num_res_blocks=enc.num_res_blocks,
    latent_channels=model_config.latent_channels,
    mid_attention=enc.mid_attention,
    num_groups=model_config.num_groups,
    dtype=jnp.dtype(model_config.get("dtype", "float32")),
  )


def decoder_from_config(decoder_config, model_config) -> Decoder:
  """A decoder from `model.decoder` (the full one) or `model.light_decoder`."""
  if len(decoder_config.channel_mult) != len(model_config.encoder.channel_mult):
    raise ValueError(
      f"decoder channel_mult {tuple(decoder_config.channel_mult)} must have as many levels as "
      f"the encoder's {tuple(model_config.encoder.channel_mult)} (same downsampling factor)"
    )
  return Decoder(
    channels=decoder_config.channels,
    channel_mult=tuple(decoder_config.channel_mult),
    num_res_blocks=decoder_config.num_res_blocks,
    mid_attention=decoder_config.mid_attention,
    num_groups=decoder_config.get("num_groups", model_config.num_groups),
    dtype=jnp.dtype(model_config.get("dtype", "float32")),
  )


def autoencoder_from_config(model_config, *, light: bool = False) -> Autoencoder:
  """The full autoencoder, or (`light=True`) the encoder with `model.light_decoder`."""
  decoder_config = model_config.light_decoder if light else model_config.decoder
  return Autoencoder(
    encoder=encoder_from_config(model_config),
    decoder=decoder_from_config(decoder_config, model_config),
  )


def autoencoder_params(frozen, trained) -> dict:
  """The {"encoder", "decoder"} params an `Autoencoder` applies, from a vae or decoder_distill
  state or checkpoint tree: the encoder is trained in `vae`, frozen in `decoder_distill`."""
  return {"encoder": {**frozen, **trained}["encoder"], "decoder": trained["decoder"]}


def psnr(images, reconstructions):
  """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(images - reconstructions), axis=(1, 2, 3))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))

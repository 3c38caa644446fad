"""A noise-aware classifier of `shapes` attributes, read from the diffusion model's noised latents.

It sees x_t and t, as the UNet does, and predicts every caption attribute (`kind_0`, `color_0`, …,
`background`); its log-probability gradient ∇ log p(attributes | x_t) is the guidance signal of
classifier guidance (Dhariwal & Nichol, 2021; `samplers.classifier_guidance`). The body is the
UNet's residual blocks with the timestep added to each; the last map is flattened rather than
pooled, because positions and left/right relations are attributes too.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from md_jax.data.shapes_scene import LABEL_NAMES
from md_jax.models import partitioned
from md_jax.models.conv_blocks import ResBlock
from md_jax.models.embeddings import TimestepEmbedding


class NoisyLatentClassifier(nn.Module):
  num_classes: tuple[tuple[str, int], ...]  # ((label key, number of classes), ...)
  channels: Sequence[int] = (32, 64, 128)
  blocks_per_level: int = 2
  time_dim: int = 128
  feature_dim: int = 256
  num_groups: int = 8

  @classmethod
  def from_config(cls, config) -> "NoisyLatentClassifier":
    """The classifier of a `latent_classifier` run's config, a head for every `shapes` label."""
    model = config.model
    return cls(
      num_classes=tuple((key, len(names)) for key, names in LABEL_NAMES.items()),
      channels=tuple(model.channels),
      blocks_per_level=model.blocks_per_level,
      time_dim=model.time_dim,
      feature_dim=model.feature_dim,
      num_groups=model.num_groups,
    )

  @nn.compact
  def __call__(self, x_t, t, *, feature_map: bool = False):
    """x_t (B, h, w, C) latents noised to integer timesteps t (B,) → {label key: logits (B, n)};
    `feature_map`: the last map before the heads instead, (B, h/2^(L-1), w/2^(L-1), channels[-1])
    (the heads are never built): what a representation-alignment loss reads."""
    temb = TimestepEmbedding(self.time_dim // 2, self.time_dim, name="time_embedding")(t)
    h = partitioned.conv(self.channels[0], 3, name="conv_in")(x_t)
    for level, width in enumerate(self.channels):
      if level > 0:  # halve the map between widths, as the UNet's encoder does
        h = nn.avg_pool(h, (2, 2), (2, 2))
      for block in range(self.blocks_per_level):
        h = ResBlock(width, self.num_groups, name=f"block_{level}_{block}")(h, temb)
    h = nn.swish(partitioned.group_norm(self.num_groups, name="norm_out")(h))
    if feature_map:
      return h
    h = h.reshape(h.shape[0], -1)
    features = nn.swish(partitioned.dense(self.feature_dim, ("embed", "mlp"), name="features")(h))
    return {
      key: partitioned.dense(n, ("mlp", None), name=f"head_{key}")(features).astype(jnp.float32)
      for key, n in self.num_classes
    }

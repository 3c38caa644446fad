"""The `shapes` evaluator's network: predicts every caption attribute of a `shapes` image.

A small conv net (3×3 convs, GroupNorm, swish, stride-2 between widths) whose last map is
flattened rather than average-pooled, because positions and left/right relations are attributes
too; a dense layer gives the feature vector the Fréchet distance is computed on, and one linear
head per label key (`kind_0`, `color_0`, …, `background`) gives that attribute's logits.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from md_jax.data.shapes_scene import LABEL_NAMES
from md_jax.models import partitioned


class ShapesClassifier(nn.Module):
  num_classes: tuple[tuple[str, int], ...]  # ((label key, number of classes), ...)
  channels: Sequence[int] = (32, 64, 128, 128)
  feature_dim: int = 256
  num_groups: int = 8

  @classmethod
  def from_config(cls, config) -> "ShapesClassifier":
    """The classifier of a `shapes_classifier` run's config, a head for every `shapes` label."""
    return cls(
      num_classes=tuple((key, len(names)) for key, names in LABEL_NAMES.items()),
      channels=tuple(config.model.channels),
      feature_dim=config.model.feature_dim,
      num_groups=config.model.num_groups,
    )

  @nn.compact
  def __call__(self, images):
    """images (B, H, W, 3) in [-1, 1] → ({label key: logits (B, n)}, features (B, feature_dim))."""
    h = images
    for level, width in enumerate(self.channels):
      h = partitioned.conv(width, 3, strides=1 if level == 0 else 2, name=f"conv_{level}_0")(h)
      h = nn.swish(partitioned.group_norm(self.num_groups, name=f"norm_{level}_0")(h))
      h = partitioned.conv(width, 3, name=f"conv_{level}_1")(h)
      h = nn.swish(partitioned.group_norm(self.num_groups, name=f"norm_{level}_1")(h))
    h = h.reshape(h.shape[0], -1)
    features = nn.swish(partitioned.dense(self.feature_dim, ("embed", "mlp"), name="features")(h))
    logits = {
      key: partitioned.dense(n, ("mlp", None), name=f"head_{key}")(features)
      for key, n in self.num_classes
    }
    return logits, features.astype(jnp.float32)

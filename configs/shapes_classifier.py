"""Stage `shapes_classifier`: the attribute classifier the `shapes` evaluator scores images with.

    python -m md_jax.main --config=configs/shapes_classifier.py --workdir=workdirs/shapes_classifier
    python -m md_jax.main --config=configs/shapes_classifier.py:tiny --workdir=/tmp/cls  # tests

Trained on real `shapes/r64` images at the resolution the diffusion model generates, with every
caption attribute as a label.
"""

import ml_collections

from md_jax.config_utils import load_config
from md_jax.data.shapes_scene import LABEL_NAMES


def get_config(arg=None):
  config = load_config("data.py", relative_to=__file__)
  config.stage = "shapes_classifier"
  config.seed = 0
  config.data.dataset = "shapes/r64"
  config.data.resolution = 64
  config.data.label_keys = tuple(LABEL_NAMES)
  config.global_batch_size = 32
  config.num_train_steps = 2000
  config.model = ml_collections.ConfigDict(
    {"channels": (32, 64, 128, 128), "feature_dim": 256, "num_groups": 8}
  )
  config.optimizer = ml_collections.ConfigDict(
    {"name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.999, "weight_decay": 1e-4,
     "warmup_steps": 100, "grad_clip": 1.0}
  )  # fmt: skip
  config.ema_decay = 0.99
  config.init_checkpoint = ""
  config.checkpoint_every = 1000
  config.max_checkpoints_to_keep = 1
  # Resume from this step instead of the newest (newer ones are set aside as <step>.superseded).
  config.restore_step = ml_collections.config_dict.placeholder(int)
  config.log_every = 50
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "dcn_data": 1})
  if arg == "tiny":
    config.data.dataset = "shapes/r32_small"
    config.data.resolution = 32
    config.global_batch_size = 16
    config.num_train_steps = 40
    config.model.channels = (8, 16)
    config.model.feature_dim = 32
    config.model.num_groups = 4
    config.optimizer.warmup_steps = 5
    config.log_every = 10
  elif arg is not None:
    raise ValueError(f"configs/shapes_classifier.py: unknown variant {arg!r} (known: tiny)")
  return config

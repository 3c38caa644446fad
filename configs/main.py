"""The main job: what the README's first command runs on a fresh machine.

    python -m md_jax.main --config=configs/main.py --workdir=workdirs/main

Today it builds the embedded `shapes` dataset and streams the training input pipeline through it
(writing `data_preview.png` and throughput to TensorBoard). As the stages land it grows into the
whole system on `shapes`: vae → decoder_distill → diffusion → ufogen → export.
"""

from md_jax.config_utils import load_config


def get_config(arg=None):
  config = load_config("data.py", relative_to=__file__)
  config.data.dataset = "shapes/r64"  # the default builder config: builds in well under a minute
  config.data.resolution = 64
  config.num_batches = 100
  if arg == "quick":
    config.num_batches = 10
  elif arg is not None:
    raise ValueError(f"configs/main.py: unknown variant {arg!r} (known: quick)")
  return config

"""The input pipeline on its own: builds a dataset and streams training batches.

    python -m md_jax.main --config=configs/data.py --workdir=workdirs/data
    python -m md_jax.benchmarks.input_pipeline --config=configs/data.py
    python -m md_jax.main --config=configs/data.py:tiny --workdir=/tmp/data   # seconds, for CI

Any TFDS image-text dataset works (TFDS reads manual downloads from
`<data_dir>/downloads/manual`). COCO is `coco_captions/2014` (its only config: COCO 2014 in
Karpathy's splits), about five captions an image, one drawn per example per epoch:
`--config.data.dataset=coco_captions/2014 --config.data.caption_key=captions/text`, split `train`
(COCO's train2014); COCO 2014 validation, where FID-30K draws its captions, is
`--config.data.split=val+test+restval`.
"""

import ml_collections

from md_jax.infra import sharding


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.stage = "data"
  config.seed = 0
  config.global_batch_size = 64
  config.num_batches = 50  # how many batches the `data` stage streams
  config.log_every = 10

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "dcn_data": 1})
  config.logical_axis_rules = sharding.DEFAULT_LOGICAL_AXIS_RULES

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "shapes/r256"
  config.data.data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets); gs:// works on pods
  config.data.split = "train"
  config.data.image_key = "image"
  config.data.caption_key = "caption"
  config.data.label_keys = ()
  config.data.resolution = 256
  config.data.random_crop = False
  # Off by default: a mirrored image contradicts captions that say "left of" (as in `shapes`).
  config.data.random_flip = False
  config.data.seed = 0
  config.data.num_threads = 4
  config.data.prefetch_examples = 256
  config.data.prefetch_batches = 2
  config.data.tokenizer_dir = ""  # "" = the CLIP-format vocabulary shipped for `shapes`

  if arg == "tiny":
    config.data.dataset = "shapes/r32_small"
    config.data.resolution = 32
    config.global_batch_size = 16
    config.num_batches = 5
  elif arg is not None:
    raise ValueError(f"configs/data.py: unknown variant {arg!r} (known: tiny)")
  return config

"""The cached-latents dataset: the format `md_jax.cache_latents` writes and the pipeline reads.

    DIR/r256/   one TFDS dataset directory per resolution (dataset_info.json, features.json,
                cached_latents-<split>.array_record-0000i-of-0000n), read by index like any other
    DIR/r256/cache_spec.json                 what the cache was made from, and how it is sharded
    DIR/r256/<shard file>.done.json          a shard's completion mark: written after the shard

Each row holds "latents" (h, w, c), the scaled VAE posterior mean `LatentSpace.encode` gives;
"text_states" (77, width), the text encoder's last hidden states; "tokens" (77,), the caption's
ids (the trainer's sample grids prompt with them); "index", the source split's row it came from.
Rows are in the source split's order, so a cached run reads, step for step, the examples an
uncached run reads (the pipeline permutes rows by index alike), as long as no image was skipped.
"""

import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import naming

NAME = "cached_latents"
SPEC_NAME = "cache_spec.json"
DONE_SUFFIX = ".done.json"
DTYPES = ("float16", "float32")
FLOAT_KEYS = ("latents", "text_states")  # stored in the cache's dtype, trained on as float32
BATCH_KEYS = ("latents", "text_states", "tokens")


def resolution_dir(root: str, resolution: int) -> epath.Path:
  return epath.Path(root) / f"r{resolution}"


def features(latent_shape, text_shape, dtype: str) -> tfds.features.FeaturesDict:
  """Raw bytes per tensor (TFDS's BYTES encoding): float16 as it is, no float_list widening."""
  raw = tfds.features.Encoding.BYTES
  dtype = np.dtype(dtype)
  return tfds.features.FeaturesDict(
    {
      "latents": tfds.features.Tensor(shape=tuple(latent_shape), dtype=dtype, encoding=raw),
      "text_states": tfds.features.Tensor(shape=tuple(text_shape), dtype=dtype, encoding=raw),
      "tokens": tfds.features.Tensor(shape=(text_shape[0],), dtype=np.int32, encoding=raw),
      "index": tfds.features.Scalar(dtype=np.int64),
    }
  )


def shard_template(directory, split: str) -> naming.ShardedFileTemplate:
  return naming.ShardedFileTemplate(
    data_dir=epath.Path(directory), dataset_name=NAME, split=split, filetype_suffix="array_record"
  )


def open_cache(root: str, resolution: int, what: str = "config.latents.cached"):
  """The TFDS builder of the `resolution` px cache under `root`; a missing or unfinished one is
  one error naming `what`."""
  directory = resolution_dir(root, resolution)
  if not (directory / "dataset_info.json").exists():
    state = "is unfinished (rerun its command: it resumes)" if directory.exists() else "is missing"
    raise FileNotFoundError(
      f"{what}={root!r}: the {resolution} px cache {directory} {state}; write it with "
      f"`python -m md_jax.cache_latents --config=... --out={root}` (--resolutions={resolution})"
    )
  return tfds.builder_from_directory(str(directory))


def check_split(builder, root: str, resolution: int, split: str, what="config.latents.cached"):
  if split not in builder.info.splits:
    raise ValueError(
      f"{what}={root!r}: the {resolution} px cache holds splits {sorted(builder.info.splits)}, "
      f"not config.data.split={split!r}"
    )


def data_source(root: str, resolution: int, split: str, what: str = "config.latents.cached"):
  builder = open_cache(root, resolution, what)
  check_split(builder, root, resolution, split, what)
  return builder.as_data_source(split)


def read_spec(root: str, resolution: int) -> dict:
  path = resolution_dir(root, resolution) / SPEC_NAME
  return json.loads(path.read_text()) if path.exists() else {}


def check_shapes(builder, resolution, latent_shape, text_shape, what="config.latents.cached"):
  """The cache's arrays are the shapes this run's UNet reads, or one error naming both."""
  found = builder.info.features
  for key, want, why in (
    ("latents", tuple(latent_shape), "the latent space's at this resolution"),
    ("text_states", tuple(text_shape), "77 tokens × config.model.text_dim"),
  ):
    have = tuple(found[key].shape)
    if have != want:
      raise ValueError(
        f"{what}={str(builder.data_dir)!r} holds {key} of shape {have} at {resolution} px, but "
        f"this run reads {want} ({why}): a cache of another model; write one for this config"
      )


def collate(rows) -> dict:
  """Stacks decoded rows into a local batch (the row indices stay behind: nothing trains on
  them)."""
  return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}

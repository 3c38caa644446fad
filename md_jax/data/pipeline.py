"""The input pipeline: a TFDS image-text dataset → global, sharded batches of images and tokens.

Examples are read by index (`tfds` data source over ArrayRecord) in a Grain pipeline:

    global permutation (seed, epoch) → this process's rows → decode, resize, crop, flip
    → drop undecodable → local batch → tokenize → prefetch → global jax.Array on the mesh

With `cached_latents` (a `md_jax.cache_latents` directory) the rows are precomputed latents and
text states instead (`data/latent_cache.py`), read in the same order: the same permutation of the
same rows, nothing to decode.

Because the order is a pure function of the seed, the iterator's position is a few integers
(`get_state()` / `set_state()`), and a resumed run sees exactly the batch it would have seen.
Each process reads its own contiguous rows of every global batch (`ProcessRowsMapDataset`), so a
global batch is the same, row for row, whatever the number of processes.

`caption_key` may name a nested feature ("captions/text") and may hold a sequence of captions
(COCO: about five an image). Training draws one per example per epoch from (seed, epoch, row);
evaluation reads a fixed one per example from (seed, row) — `eval_captions` lists them without
decoding an image. Both are pure functions of those integers: a resumed run reads the same
captions. An example with no caption is skipped and counted, like an undecodable image.
"""

import dataclasses
import io
import logging
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from md_jax.data import captions, conditions, latent_cache
from md_jax.data import tokenizer as tokenizer_lib
from md_jax.data.prepare import prepare_dataset
from md_jax.data.process_rows import ProcessRowsMapDataset
from md_jax.infra import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Decode → resize shorter side → crop → optional flip, on one example, on the host; one of
  the example's captions (`captions.pick_caption`)."""

  resolution: int
  image_key: str = "image"
  caption_key: str = "caption"
  label_keys: tuple[str, ...] = ()
  random_crop: bool = False
  random_flip: bool = False
  caption_seed: int = 0
  # Control plugins' condition maps (`data/conditions.py`), from the cropped, flipped image:
  # each name adds "condition_<name>", uint8 (H, W, channels).
  conditions: tuple[str, ...] = ()

  def __call__(self, example, rng: np.random.Generator):
    # Before the decode: an example without a caption costs no image decode.
    caption = captions.pick_caption(example, self.caption_key, self.caption_seed)
    if caption is None:
      return Undecodable(f"no caption under {self.caption_key!r}")
    try:
      image = Image.open(io.BytesIO(example[self.image_key]))
      image = image.convert("RGB")  # forces the decode: a corrupt file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      return Undecodable(f"undecodable image: {e!r}")
    image = self._resize_and_crop(image, rng)
    if self.random_flip and rng.random() < 0.5:
      image = image[:, ::-1]
    out = {"image": image, "caption": caption}
    for kind in self.conditions:
      out[f"condition_{kind}"] = conditions.compute(kind, image)
    for key in self.label_keys:
      out[key] = np.int32(captions.feature_value(example, key))
    return out

  def _resize_and_crop(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    res = self.resolution
    width, height = image.size
    scale = res / min(width, height)
    if scale != 1:
      size = (max(res, round(width * scale)), max(res, round(height * scale)))
      # Bicubic with PIL's reducing filter anti-aliases downscales; no aliasing on small images.
      image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
      width, height = size
    if self.random_crop:
      left = int(rng.integers(0, width - res + 1))
      top = int(rng.integers(0, height - res + 1))
    else:
      left, top = (width - res) // 2, (height - res) // 2
    return np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Undecodable:
  """An example the pipeline drops: its image would not decode, or it has no caption."""

  reason: str


class _SkipCounter:
  """Counts (and logs) examples dropped because their image would not decode or they have no
  caption.

  Decoding runs on Grain's reader threads in this process, hence the lock.
  """

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()

  def keep(self, element) -> bool:
    if not isinstance(element, Undecodable):
      return True
    with self._lock:
      self.count += 1
      count = self.count
    logging.warning("Skipped an example (%d so far): %s", count, element.reason)
    return False


class InputIterator:
  """Yields global batches {"image": f32 [-1, 1] (B, H, W, 3), "tokens": i32 (B, 77), labels...}
  (from a cache: {"latents": f32 (B, h, w, c), "text_states": f32 (B, 77, D), "tokens"}).

  Each leaf is a `jax.Array` sharded over the mesh's batch axes. `get_state()`/`set_state()` save
  and restore the position (a small JSON-able dict).
  """

  def __init__(self, dataset: grain.IterDataset, skip_counter: _SkipCounter):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._skip_counter = skip_counter

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)

  def close(self) -> None:
    """Stops the prefetch threads (else they are stopped when the iterator is collected)."""
    self._iterator.close()

  @property
  def num_skipped(self) -> int:
    """Examples skipped so far by this process (undecodable image or no caption)."""
    return self._skip_counter.count


def image_source(data_config):
  """The examples of `config.data`'s dataset and split, by index, images still encoded (for
  `Preprocess` to decode, which can skip a bad one), each carrying its row (`captions.ROW_KEY`).

  The split may be any TFDS split spec: "val+test+restval" (COCO 2014's validation images in the
  Karpathy splits), "train[:1000]".
  """
  builder = prepare_dataset(data_config.dataset, data_config.get("data_dir") or None)
  for name in captions.split_names(data_config.split):
    if name not in builder.info.splits:
      raise ValueError(
        f"config.data.split={data_config.split!r}: {builder.info.full_name} has splits "
        f"{sorted(builder.info.splits)}"
      )
  image_key = data_config.get("image_key", "image")
  names = captions.feature_names(builder.info.features)
  if image_key not in builder.info.features:  # decoders below name a top-level feature
    raise ValueError(captions.no_feature("image_key", image_key, builder.info.full_name, names))
  for what, key in [("caption_key", data_config.get("caption_key", "caption"))] + [
    ("label_keys", k) for k in data_config.get("label_keys", ())
  ]:
    if key not in names:
      raise ValueError(captions.no_feature(what, key, builder.info.full_name, names))
  source = builder.as_data_source(
    data_config.split, decoders={image_key: tfds.decode.SkipDecoding()}
  )
  return captions.RowSource(source)


def make_preprocess(data_config, *, train: bool) -> Preprocess:
  """`config.data`'s `Preprocess`: random crop and flip only where `train` and asked for."""
  return Preprocess(
    resolution=data_config.resolution,
    image_key=data_config.get("image_key", "image"),
    caption_key=data_config.get("caption_key", "caption"),
    label_keys=tuple(data_config.get("label_keys", ())),
    random_crop=train and data_config.get("random_crop", False),
    random_flip=train and data_config.get("random_flip", False),
    caption_seed=data_config.get("seed", 0),
    conditions=tuple(data_config.get("conditions", ())),
  )


def eval_captions(data_config, rows=None) -> list[str | None]:
  """The caption each of `rows` (default: all) of `config.data`'s split contributes to
  evaluation (`create_input_iterator(..., train=False)`), without decoding an image; None for
  an example without a caption, which the pipeline skips (as it skips an undecodable image,
  which this does not detect)."""
  source = image_source(data_config)
  caption_key = data_config.get("caption_key", "caption")
  seed = data_config.get("seed", 0)
  rows = [int(row) for row in (range(len(source)) if rows is None else rows)]
  found = []
  for start in range(0, len(rows), 1024):  # batched reads: 30K rows in seconds, not minutes
    examples = source.__getitems__(rows[start : start + 1024])
    found += [captions.pick_caption(example, caption_key, seed) for example in examples]
  return found


def create_input_iterator(
  data_config,
  *,
  global_batch_size: int,
  mesh: jax.sharding.Mesh,
  rules,
  train: bool = True,
  tokenizer=None,
  cached_latents: str = "",
) -> InputIterator:
  """Builds the pipeline described by `data_config` (a `config.data` ConfigDict).

  Keys: dataset, data_dir, split, image_key, caption_key, label_keys, conditions, resolution,
  random_crop, random_flip, seed, num_threads, prefetch_examples, prefetch_batches, tokenizer_dir.
  `train=False` reads the split once, in order, without augmentation, each example's caption
  fixed (`eval_captions`); a last partial batch is dropped because every global batch must have
  the same sharded shape.
  `cached_latents` (`config.latents.cached`): batches of {"latents", "text_states", "tokens"}
  from that cache at `data_config.resolution` instead of images.
  """
  num_shards = sharding_lib.batch_axis_size(mesh, rules)
  if global_batch_size % num_shards:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {num_shards} batch "
      "shards of config.mesh"
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by {jax.process_count()} processes"
    )
  local_batch_size = global_batch_size // jax.process_count()

  skip_counter = _SkipCounter()
  if cached_latents:
    source = latent_cache.data_source(cached_latents, data_config.resolution, data_config.split)
    if train and (data_config.get("random_crop") or data_config.get("random_flip")):
      logging.warning(
        "config.latents.cached: the cache holds centre crops, unflipped; config.data's "
        "random_crop and random_flip do not apply"
      )
  else:
    source = image_source(data_config)
    preprocess = make_preprocess(data_config, train=train)
    tokenizer = tokenizer or tokenizer_lib.load_tokenizer(data_config.get("tokenizer_dir") or None)

  ds = grain.MapDataset.source(source).seed(data_config.get("seed", 0))
  if train:
    ds = ds.shuffle().repeat()  # a fresh permutation every epoch, reproducible from the seed
    if not cached_latents:  # indexed by the global stream position, before this process's rows
      ds = ds.map_with_index(captions.WithEpoch(len(source)))
  ds = ProcessRowsMapDataset(ds, global_batch_size, jax.process_index(), jax.process_count())
  read_options = grain.ReadOptions(
    num_threads=data_config.get("num_threads", 4),
    prefetch_buffer_size=data_config.get("prefetch_examples", 256),
  )
  if cached_latents:  # records decode to arrays: nothing to drop, nothing to tokenize
    ds = ds.to_iter_dataset(read_options)
    ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=latent_cache.collate)
  else:
    ds = ds.random_map(preprocess).to_iter_dataset(read_options).filter(skip_counter.keep)
    ds = ds.batch(local_batch_size, drop_remainder=True, batch_fn=_Collate(tokenizer))
  ds = ds.map(_ToGlobal(mesh, rules))
  # Collation and the host→device copy run on a background thread, ahead of the train step.
  ds = grain.experimental.ThreadPrefetchIterDataset(
    ds, prefetch_buffer_size=data_config.get("prefetch_batches", 2)
  )
  return InputIterator(ds, skip_counter)


@dataclasses.dataclass(frozen=True)
class _Collate:
  """Stacks examples and tokenizes the captions in one batched call (images stay uint8)."""

  tokenizer: object

  def __call__(self, examples):
    batch = {
      "image": np.stack([e["image"] for e in examples]),
      "tokens": tokenizer_lib.tokenize(self.tokenizer, [e["caption"] for e in examples]),
    }
    for key in examples[0]:
      if key not in ("image", "caption"):
        batch[key] = np.stack([e[key] for e in examples])
    return batch


@dataclasses.dataclass(frozen=True)
class _ToGlobal:
  """Turns this process's batch into global `jax.Array`s sharded over the batch axes.

  Images cross to the devices as uint8 and are scaled to [-1, 1] there: a quarter of the bytes
  of float32 over the host link, and one fused pass on the device instead of three on the host.
  Cached latents and text states likewise cross in the cache's dtype (float16 by default) and
  become float32 there.
  """

  mesh: jax.sharding.Mesh
  rules: tuple

  def __call__(self, local_batch):
    def to_global(x):
      sharding = sharding_lib.batch_sharding(self.mesh, self.rules, x.ndim)
      return jax.make_array_from_process_local_data(sharding, x)

    batch = jax.tree.map(to_global, local_batch)
    if "image" in batch:
      batch["image"] = uint8_to_signed_unit(batch["image"])
    for key in latent_cache.FLOAT_KEYS:
      if key in batch:
        batch[key] = _to_float32(batch[key])
    return batch


@jax.jit
def _to_float32(x):
  return x.astype(jnp.float32)


@jax.jit
def uint8_to_signed_unit(images):
  # XLA turns the division into a multiply by float32(1/127.5), which maps 255 one ulp above 1.0:
  # the clip (fused, free) keeps the promised range exact.
  return jnp.clip(images.astype(jnp.float32) / 127.5 - 1, -1, 1)

"""Precomputes a diffusion run's frozen encoders once: its latents and text states, in ArrayRecord.

    python -m md_jax.cache_latents --config=configs/mobilediffusion.py \
        --config.latents.checkpoint=gs://BUCKET/vae_light --config.text_encoder.path=/clip-l-14 \
        --config.data.dataset=my_images --config.data.data_dir=gs://BUCKET/tfds \
        --out=gs://BUCKET/md_cache
    python -m md_jax.main --config=configs/mobilediffusion.py ...the same flags... \
        --config.latents.cached=gs://BUCKET/md_cache --workdir=gs://BUCKET/md

With the VAE encoder and CLIP frozen, every epoch of a run recomputes the same latents and text
states; computed once, the step runs the UNet alone. For each phase resolution of the config (or
`--resolutions`), `config.data.split` is read by the input pipeline's own source and `Preprocess`
in order, centre-cropped and unflipped (a cache cannot hold a fresh random crop per epoch),
encoded with the frozen parameters a fresh run of the config holds (`DiffusionStage.
frozen_encoders`: its seed's init, the pretrained CLIP and VAE, `config.init_checkpoint`'s frozen
parts), and written as TFDS dataset `OUT/r<resolution>` (format: `md_jax/data/latent_cache.py`).

The VAE posterior's mean is cached, not a sample from it: the mean is what the diffusion stage
trains on (`LatentSpace.encode` takes the mode), so a cached run trains on an uncached run's
latents. float16 (`--dtype`) halves the bytes on disk and over the host link; latents round within
5e-4 relative (the full-size UNet computes in bfloat16, which rounds more), and a bfloat16 text
encoder's states are stored exactly. A value beyond float16's range is an error (`--dtype=float32`
then).

Resumable: shard i holds rows [i·N, (i+1)·N) of the split (N = `--examples_per_shard`), written
under a temporary name and renamed, then marked done (`<shard>.done.json`); a rerun skips marked
shards, and refuses an `--out` whose `cache_spec.json` asks for another cache. Processes started
with `--distributed` (`jax.distributed`) each write shards i ≡ process index (mod count), encoding
on their own devices; process 0 writes the dataset info once every shard is done.
"""

import json
import math
import os

import numpy as np

from md_jax.data import latent_cache

DEFAULT_EXAMPLES_PER_SHARD = 4096  # about 0.7 GB at 512 px with CLIP ViT-L/14 in float16


def cache_latents(
  config,
  out: str,
  *,
  resolutions=(),
  examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
  batch_size: int = 64,
  dtype: str = "float16",
) -> dict:
  """Writes (or completes) the caches of `config` under `out`; returns {resolution: report}."""
  import jax

  from md_jax.infra.phases import phases_from_config
  from md_jax.training import diffusion

  _check_arguments(config, out, examples_per_shard, batch_size, dtype)
  stage = diffusion.DiffusionStage(config)
  text_params, autoencoder_params = stage.frozen_encoders()
  encoder = _Encoder(stage.pipeline, text_params, autoencoder_params, dtype)
  if batch_size % encoder.num_devices:
    raise ValueError(
      f"--batch_size={batch_size} is not divisible by this process's {encoder.num_devices} devices"
    )
  resolutions = list(resolutions) or sorted({p.resolution for p in phases_from_config(config)})
  reports = {}
  for resolution in resolutions:
    reports[resolution] = _cache_resolution(
      config, stage.pipeline, encoder, out, resolution, examples_per_shard, batch_size, dtype
    )
    if jax.process_index() == 0:
      print(f"{latent_cache.resolution_dir(out, resolution)}: {json.dumps(reports[resolution])}")
  return reports


def _check_arguments(config, out, examples_per_shard, batch_size, dtype) -> None:
  if not out:
    raise ValueError("--out: required (the directory the caches go into)")
  if config.get("stage") not in ("diffusion", "relu_finetune"):
    raise ValueError(
      f"--config: config.stage={config.get('stage')!r}; caches are of a diffusion or "
      "relu_finetune config's encoders"
    )
  if config.latents.get("cached"):
    raise ValueError(
      f"config.latents.cached={config.latents.cached!r}: leave it empty here (--out names the "
      "cache to write; the training run sets it)"
    )
  if dtype not in latent_cache.DTYPES:
    raise ValueError(f"--dtype={dtype}: use one of {latent_cache.DTYPES}")
  if examples_per_shard < 1 or batch_size < 1:
    raise ValueError("--examples_per_shard and --batch_size must be at least 1")


class _Encoder:
  """The frozen encoders as one jitted program over this process's devices (the batch split
  over them, the parameters replicated), under the default logical-axis rules."""

  def __init__(self, pipeline, text_params, autoencoder_params, dtype):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from md_jax.data.pipeline import uint8_to_signed_unit
    from md_jax.infra import sharding

    self.mesh = sharding.create_mesh({"data": -1, "fsdp": 1}, devices=jax.local_devices())
    self.rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
    self.num_devices = self.mesh.size
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self.params = jax.device_put((text_params, autoencoder_params), replicated)

    def encode(params, images, tokens):
      text_params, autoencoder_params = params
      latents = pipeline.latent_space.encode(autoencoder_params, uint8_to_signed_unit(images))
      text = pipeline.encode_text(text_params, tokens)
      return latents.astype(dtype), text.astype(dtype)

    self._encode = jax.jit(encode)

  def __call__(self, images: np.ndarray, tokens: np.ndarray):
    """uint8 images (B, H, W, 3), token ids (B, 77) → host (latents, text states)."""
    import flax.linen as nn
    import jax

    from md_jax.infra import sharding

    def put(x):
      return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim))

    with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
      out = self._encode(self.params, put(images), put(tokens))
    return tuple(np.asarray(x) for x in jax.device_get(out))


def _cache_resolution(config, pipeline, encoder, out, resolution, per_shard, batch_size, dtype):
  import jax

  from md_jax.data import pipeline as pipeline_lib
  from md_jax.data import tokenizer as tokenizer_lib

  data_config = config.data.copy_and_resolve_references()
  data_config.resolution = resolution
  source = pipeline_lib.image_source(data_config)
  preprocess = pipeline_lib.make_preprocess(data_config, train=False)
  num_shards = max(1, math.ceil(len(source) / per_shard))
  directory = latent_cache.resolution_dir(out, resolution)
  spec = {
    "resolution": resolution,
    "data.dataset": data_config.dataset,
    "data.data_dir": data_config.get("data_dir", ""),
    "data.split": data_config.split,
    "source_rows": len(source),
    "examples_per_shard": per_shard,
    "num_shards": num_shards,
    "dtype": dtype,
    "latents.kind": config.latents.kind,
    "latents.checkpoint": config.latents.get("checkpoint", ""),
    "latent_scale": float(pipeline.latent_space.scale),
    "text_encoder.path": config.text_encoder.get("path", ""),
    "tokenizer": tokenizer_lib.tokenizer_dir_of(config)[0],
    "init_checkpoint": config.get("init_checkpoint", ""),
    "seed": config.seed,
  }
  _claim(directory, spec)
  template = latent_cache.shard_template(directory, data_config.split)
  feature_dict = latent_cache.features(
    pipeline.latent_shape(resolution),
    (tokenizer_lib.CONTEXT_LENGTH, pipeline.unet.text_dim),
    dtype,
  )
  written = []
  for shard in range(jax.process_index(), num_shards, jax.process_count()):
    path = template.sharded_filepath(shard_index=shard, num_shards=num_shards)
    if _done(path) is not None:
      continue
    rows = range(shard * per_shard, min((shard + 1) * per_shard, len(source)))
    examples = _examples(source, rows, preprocess, data_config)
    _write_shard(path, examples, pipeline, encoder, feature_dict, batch_size)
    written.append(shard)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"cache_latents r{resolution}")
  paths = [template.sharded_filepath(shard_index=i, num_shards=num_shards)
           for i in range(num_shards)]  # fmt: skip
  marks = [_done(p) for p in paths]
  if any(m is None for m in marks):  # another process failed: its shards are missing
    missing = [i for i, m in enumerate(marks) if m is None]
    raise RuntimeError(f"{directory}: shards {missing} are not done; rerun to complete them")
  if jax.process_index() == 0:
    import tensorflow_datasets as tfds

    from md_jax.data import ingest

    split_info = tfds.core.SplitInfo(
      name=data_config.split,
      shard_lengths=[m["examples"] for m in marks],
      num_bytes=sum(m["num_bytes"] for m in marks),
      filename_template=template,
    )
    ingest.write_dataset_info(
      directory, latent_cache.NAME, feature_dict, [split_info],
      description=f"Latents and text states of {data_config.dataset} by md_jax.cache_latents.",
    )  # fmt: skip
  return {
    "examples": sum(m["examples"] for m in marks),
    "skipped": sum(m["skipped"] for m in marks),
    "shards": num_shards,
    "written_now": written,
  }


def _claim(directory, spec: dict) -> None:
  """Records what `directory` caches; a rerun must ask for the same cache to resume it."""
  path = directory / latent_cache.SPEC_NAME
  if path.exists():
    found = json.loads(path.read_text())
    differ = {k: (found.get(k), v) for k, v in spec.items() if found.get(k) != v}
    if differ:
      key, (theirs, ours) = next(iter(differ.items()))
      raise ValueError(
        f"--out: {directory} caches {key}={theirs!r}, this command asks for {ours!r} (and "
        f"{len(differ) - 1} more differences): use another --out, or delete it to start over"
      )
    return
  directory.mkdir(parents=True, exist_ok=True)
  _write_atomically(path, json.dumps(spec, indent=2, sort_keys=True) + "\n")  # same on every host


def _done(path) -> dict | None:
  """A shard's completion mark (its counts), or None while the shard is not complete."""
  mark = path.parent / (path.name + latent_cache.DONE_SUFFIX)
  if not (mark.exists() and path.exists()):
    return None
  return json.loads(mark.read_text())


def _write_atomically(path, text: str) -> None:
  import jax

  temporary = path.parent / f"{path.name}.incomplete.{jax.process_index()}"
  temporary.write_text(text)
  temporary.replace(path)


def _examples(source, rows: range, preprocess, data_config):
  """(row, preprocessed example or `Undecodable`) of `rows`, in order, decoded on threads."""
  import grain

  ds = grain.MapDataset.source(source)[rows.start : rows.stop]
  ds = ds.map_with_index(lambda i, example: (rows.start + i, preprocess(example, None)))
  return ds.to_iter_dataset(
    grain.ReadOptions(num_threads=data_config.get("num_threads", 4), prefetch_buffer_size=256)
  )


def _write_shard(path, examples, pipeline, encoder, feature_dict, batch_size) -> None:
  from md_jax.data import ingest
  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.data.pipeline import Undecodable

  serialize = ingest.Serializer(feature_dict)
  temporary = path.parent / (path.name + ".incomplete")
  counts = {"examples": 0, "skipped": 0, "num_bytes": 0}
  writer = ingest.open_shard_writer(temporary)
  try:
    pending = []

    def flush():
      images = np.stack([e["image"] for _, e in pending])
      # The training pipeline's tokenization (`_Collate`), with the text encoder's tokenizer.
      tokens = tokenizer_lib.tokenize(pipeline.tokenizer, [e["caption"] for _, e in pending])
      padding = batch_size - len(pending)  # one compiled shape: the last batch is padded
      images = np.concatenate([images, np.repeat(images[-1:], padding, 0)])
      padded_tokens = np.concatenate([tokens, np.repeat(tokens[-1:], padding, 0)])
      latents, text = encoder(images, padded_tokens)
      for j, (row, _) in enumerate(pending):
        if not (np.isfinite(latents[j]).all() and np.isfinite(text[j]).all()):
          raise ValueError(
            f"--dtype={latents.dtype}: row {row} of the split encodes to values beyond its "
            "range (or NaN): use --dtype=float32"
          )
        record = serialize(
          {"latents": latents[j], "text_states": text[j], "tokens": tokens[j], "index": row}
        )
        writer.write(record)
        counts["examples"] += 1
        counts["num_bytes"] += len(record)
      pending.clear()

    for row, example in examples:
      if isinstance(example, Undecodable):
        counts["skipped"] += 1
        continue
      pending.append((row, example))
      if len(pending) == batch_size:
        flush()
    if pending:
      flush()
  finally:
    writer.close()
  temporary.replace(path)  # the shard appears whole, then its mark says so
  _write_atomically(path.parent / (path.name + latent_cache.DONE_SUFFIX), json.dumps(counts) + "\n")


def _main(argv) -> None:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if f.distributed:  # as md_jax.main: auto-detected on TPU pods, flags elsewhere
    from md_jax.infra import distributed

    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  cache_latents(
    f.config,
    f.out,
    resolutions=[int(r) for r in f.resolutions],
    examples_per_shard=f.examples_per_shard,
    batch_size=f.batch_size,
    dtype=f.dtype,
  )


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "The diffusion config whose encoders to cache.")
  flags.DEFINE_string("out", None, "Directory of the caches: --config.latents.cached reads it.")
  flags.DEFINE_list("resolutions", [], "Resolutions to cache (default: every phase's).")
  flags.DEFINE_integer("examples_per_shard", DEFAULT_EXAMPLES_PER_SHARD, "Rows per shard.")
  flags.DEFINE_integer("batch_size", 64, "Examples per encoder call, per process.")
  flags.DEFINE_enum("dtype", "float16", list(latent_cache.DTYPES), "Stored dtype.")
  flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() first (several hosts).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto on TPU).")
  flags.DEFINE_integer("num_processes", None, "Process count (auto on TPU).")
  flags.DEFINE_integer("process_id", None, "This process's index (auto on TPU).")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  from md_jax import cli_errors

  _define_flags()
  cli_errors.define_verbose_flag()
  cli_errors.run(_main, flags_parser=lambda a: cli_errors.parse_flags(a, config_flag="config"))

"""The `data` stage: prepare the dataset and stream training batches, to see and time the input.

Writes a grid of the first batch (`<workdir>/data_preview.png`, captions in its metadata and in
TensorBoard) and logs images/s, so a user can check a new dataset config before training on it.
"""

import logging
import time

import jax
import numpy as np
from clu import metric_writers

from md_jax import visualize
from md_jax.data.pipeline import create_input_iterator
from md_jax.data.tokenizer import load_tokenizer
from md_jax.infra import sharding


def stream(config, num_batches: int, mesh=None, tokenizer=None):
  """Yields (batch, seconds since the first batch arrived) for `num_batches` global batches."""
  mesh = mesh or sharding.create_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules)
  iterator = create_input_iterator(
    config.data,
    global_batch_size=config.global_batch_size,
    mesh=mesh,
    rules=rules,
    tokenizer=tokenizer,
  )
  try:
    start = None
    for _ in range(num_batches):
      batch = jax.block_until_ready(next(iterator))
      start = start or time.perf_counter()
      yield batch, time.perf_counter() - start
    if iterator.num_skipped:
      logging.warning("%d undecodable images were skipped", iterator.num_skipped)
  finally:
    iterator.close()


def run(config, workdir: str) -> dict:
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  tokenizer = load_tokenizer(config.data.tokenizer_dir or None)
  images_per_s = 0.0
  elapsed = 0.0
  for step, (batch, elapsed) in enumerate(stream(config, config.num_batches, tokenizer=tokenizer)):
    if step == 0 and is_main:
      images = visualize.to_uint8(jax.device_get(batch["image"])[:16])
      grid = visualize.make_grid(images)
      captions = [
        tokenizer.decode(t, skip_special_tokens=True) for t in np.asarray(batch["tokens"])[:16]
      ]
      visualize.save_png(grid, f"{workdir}/data_preview.png", {"captions": "\n".join(captions)})
      writer.write_images(0, {"data/first_batch": grid[None]})
      writer.write_texts(0, {"data/captions": "\n".join(captions)})
    if step > 0 and (step % config.log_every == 0 or step == config.num_batches - 1):
      # Timed from the first batch: start-up (dataset build, threads) is not throughput.
      images_per_s = step * config.global_batch_size / elapsed
      writer.write_scalars(step, {"data/images_per_s": images_per_s})
  writer.flush()
  return {"images_per_s": images_per_s, "batches": config.num_batches}

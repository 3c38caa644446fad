"""Generating one image per caption of a split and scoring them, sharded over every device and
process, a chunk at a time: the loop under `t2i_eval` (command line) and `periodic` (training).

The split is read in order (`create_input_iterator(train=False)`); batch `i`'s noise comes from
`fold_in(seed, i)`, so an image is the same whatever the device or process count. Each process
generates and scores its rows; the rows are gathered, process 0 saves them as chunk `i`
(`chunks.py`), and the figures are computed once from all chunks — which is why a resumed or
multi-process evaluation ends with the figures of an uninterrupted one-process evaluation.
"""

import dataclasses
import json
import math
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from md_jax.evaluation.chunks import ChunkStore
from md_jax.infra import files


@dataclasses.dataclass(frozen=True)
class Setting:
  """How the images are generated: what a chunk directory's rows depend on."""

  sampler: str = "ddim"
  steps: int = 50
  cfg: float = 3.0
  eta: float = 0.0
  seed: int = 0
  resolution: int | None = None
  batch_size: int = 32

  @property
  def name(self) -> str:
    return f"{self.sampler}_{self.steps}steps_cfg{self.cfg:g}_seed{self.seed}"


def gather(tree) -> dict:
  """Every process's rows of a dict of global arrays, as numpy on every process."""
  return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}


def replicate(tree, mesh):
  """Host params onto every device of `mesh` (all processes hold the same values)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, replicated)


def evaluate_images(
  pipeline, params, data_config, metrics, *, out_dir, num_images: int, setting: Setting,
  mesh, rules, guide=None, batch_guide=None,
) -> dict:  # fmt: skip
  """Generates one image per caption of `data_config`'s split (in order), scores them with
  `metrics` and returns their summaries with `num_images` and generation `images_per_s`.

  `batch_guide(batch)`: a per-batch classifier guide (the `shapes` evaluator's), or None.
  Chunks already in `out_dir` are not redone; their settings must match (`settings.json`).
  """
  from md_jax.data.pipeline import create_input_iterator

  out_dir = epath.Path(out_dir)
  store = ChunkStore(out_dir / "chunks")
  check_settings(out_dir, setting, num_images, data_config)
  batch_size = setting.batch_size
  total = math.ceil(num_images / batch_size)
  # Process 0 decides where to start: another process listing the directory while process 0
  # writes its next chunk would start one chunk later, and the collectives would never meet.
  done = int(multihost_utils.broadcast_one_to_all(np.int32(min(store.completed(), total))))
  iterator = create_input_iterator(
    data_config, global_batch_size=batch_size, mesh=mesh, rules=rules, train=False,
    tokenizer=pipeline.tokenizer,
  )  # fmt: skip
  if done:
    iterator.set_state(store.read(done - 1)[1])
    logging.info("Resuming the evaluation in %s after chunk %d of %d", out_dir, done, total)
  seconds, timed = 0.0, 0
  try:
    for index in range(done, total):
      try:
        batch = next(iterator)
      except StopIteration:
        raise ValueError(
          f"the {data_config.dataset} split {data_config.split!r} ran out after {index} batches "
          f"of {batch_size}: fewer images than --num={num_images}"
        ) from None
      start = time.perf_counter()
      images = pipeline.generate(
        params, batch["tokens"], seed=jax.random.fold_in(jax.random.key(setting.seed), index),
        resolution=setting.resolution, sampler=setting.sampler, steps=setting.steps,
        cfg=setting.cfg, eta=setting.eta, guide=guide,
        classifier_guide=batch_guide(batch) if batch_guide else None,
      )  # fmt: skip
      rows = {}
      for metric in metrics:
        rows.update(metric.on_generated(images, batch))
        if metric.needs_real:
          rows.update(metric.on_real(batch))
      rows = gather(rows)
      if index > done:  # the first batch of a run pays for compilation
        seconds += time.perf_counter() - start
        timed += batch_size
      if jax.process_index() == 0:
        store.write(index, rows, iterator.get_state())
        rate = timed / seconds if seconds else float("nan")
        left = (total - index - 1) * batch_size / rate if seconds else float("nan")
        logging.info(
          "%s: chunk %d/%d, %.2f images/s, ETA %.0f s", out_dir.name, index + 1, total, rate, left
        )
  finally:
    iterator.close()
  multihost_utils.sync_global_devices(f"evaluation chunks written: {out_dir}")
  rows = {k: v[:num_images] for k, v in store.concatenated(total).items()}
  result = {"num_images": len(next(iter(rows.values())))}
  for metric in metrics:
    result.update(metric.summarize({k: v for k, v in rows.items() if k.startswith(metric.name)}))
  result["images_per_s"] = timed / seconds if seconds else float("nan")
  return result


def check_settings(out_dir: epath.Path, setting: Setting, num_images, data_config) -> None:
  """An output directory holds one evaluation: resuming it with other settings would mix rows of
  two evaluations, so it stops with both settings named."""
  wanted = {
    **dataclasses.asdict(setting), "num_images": num_images, "dataset": data_config.dataset,
    "split": data_config.split, "caption_key": data_config.get("caption_key", "caption"),
  }  # fmt: skip
  path = out_dir / "settings.json"
  if path.exists():
    found = json.loads(path.read_text())
    if found != wanted:
      differ = {k: (found.get(k), wanted.get(k)) for k in wanted if found.get(k) != wanted.get(k)}
      raise ValueError(
        f"{out_dir} holds an evaluation with other settings ({differ}, saved vs asked); "
        "pass another --out or delete it"
      )
  elif jax.process_index() == 0:
    files.write_whole(path, json.dumps(wanted, indent=1))

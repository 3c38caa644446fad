"""What checkpoint checksums cost: the fingerprint pass beside the save and the restore it guards.

    python -m md_jax.benchmarks.checkpoint_checksums [--megabytes=1536] [--runs=3]

A state of float32 arrays (default 1.5 GB: the full-size UNet's params) on the default device is
fingerprinted (`infra/fingerprints.py`, a small jitted pass per array on its devices), saved
synchronously through `infra.checkpoints.Checkpointer` (which fingerprints it too) and restored
(which verifies), interleaved over `--runs` rounds; medians, and the fingerprint's share of each.
Last line: one JSON object.
"""

import json
import os
import statistics
import tempfile

from absl import app, flags

_MEGABYTES = flags.DEFINE_integer("megabytes", 1536, "Size of the state.")
_RUNS = flags.DEFINE_integer("runs", 3, "Rounds (fingerprint, save, restore each once).")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import shutil

  import jax
  import jax.numpy as jnp
  import ml_collections

  from md_jax.benchmarks import timing
  from md_jax.infra import checkpoints, fingerprints

  layers = 64
  per_layer = _MEGABYTES.value * 2**20 // 4 // layers
  side = int(per_layer**0.5)
  keys = jax.random.split(jax.random.key(0), layers)
  state = {
    f"layer_{i}": jax.random.normal(k, (side, side), jnp.float32) for i, k in enumerate(keys)
  }
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  config = ml_collections.ConfigDict({"stage": "benchmark"})
  directory = tempfile.mkdtemp(prefix="md_jax_checksums_")
  checkpointer = checkpoints.Checkpointer(directory, max_to_keep=1, async_save=False)
  step = iter(range(1, 10**6))
  fingerprints.of_device_tree(state)  # compile

  def save():
    checkpointer.save(next(step), state, {"position": 0}, config)

  def restore():
    jax.block_until_ready(checkpointer.restore(checkpointer.latest_step(), abstract))

  save()
  fingerprint_s, save_s, restore_s = timing.interleaved_times(
    _RUNS.value, lambda: fingerprints.of_device_tree(state), save, restore
  )
  checkpointer.close()
  shutil.rmtree(directory)
  medians = [statistics.median(t) for t in (fingerprint_s, save_s, restore_s)]
  result = {
    "megabytes": _MEGABYTES.value,
    "fingerprint_s": round(medians[0], 3),
    "save_s": round(medians[1], 3),
    "restore_s": round(medians[2], 3),
    "fingerprint_share_of_save": round(medians[0] / medians[1], 3),
    "fingerprint_share_of_restore": round(medians[0] / medians[2], 3),
    **timing.machine(),
  }
  print(
    f"{_MEGABYTES.value} MB: fingerprint {medians[0]:.2f} s, save {medians[1]:.2f} s, "
    f"restore {medians[2]:.2f} s"
  )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

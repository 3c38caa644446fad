"""Input pipeline throughput: global training batches per second, as the train step receives them.

    python -m md_jax.benchmarks.input_pipeline --config=configs/data.py

Builds the dataset if needed, skips the warm-up batches, then times windows of batches and reports
the median images/s over windows (the machine is shared and noisy). Last line: one JSON object.
"""

import itertools
import json
import os
import statistics

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/data.py", "Pipeline config.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 5, "Batches before timing starts.")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows; the median is reported.")
_WINDOW = flags.DEFINE_integer("window_batches", 10, "Batches per timed window.")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax

  from md_jax.data import stream

  config = _CONFIG.value
  total = _WARMUP.value + _WINDOWS.value * _WINDOW.value
  marks = []
  for i, (_, elapsed) in enumerate(stream.stream(config, total)):
    if i >= _WARMUP.value - 1 and (i - _WARMUP.value + 1) % _WINDOW.value == 0:
      marks.append(elapsed)
  rates = [_WINDOW.value * config.global_batch_size / (b - a) for a, b in itertools.pairwise(marks)]
  result = {
    "images_per_s_median": round(statistics.median(rates), 1),
    "images_per_s_windows": [round(r, 1) for r in rates],
    "resolution": config.data.resolution,
    "global_batch_size": config.global_batch_size,
    "dataset": config.data.dataset,
    "devices": jax.device_count(),
    "cpu_cores": os.cpu_count(),
  }
  print(
    f"{result['images_per_s_median']} images/s of {config.data.resolution}x"
    f"{config.data.resolution} batches of {config.global_batch_size} (median of {len(rates)})"
  )
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

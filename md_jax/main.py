"""Entry point for every md_jax job.

    python -m md_jax.main --config=configs/<stage>.py[:variant] --workdir=DIR [--config.a.b=v ...]

The config names its stage; the resolved config is written to `<workdir>/config.json`. A run
stopped by SIGTERM, Ctrl-C or preemption saves, prints where it stopped and exits with status 75
(`stages.EXIT_TO_RESUME`): rerun the same command to resume.
"""

import json
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from md_jax import config_utils, main_job, stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, `path.py[:variant]`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() first (multi-host: TPU pods, GPUs)."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0; auto-detected on TPU pods."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (auto on TPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (auto on TPU).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's parser, with an unknown `--config.<key>` reported as one line naming the key."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a wrong type or a missing flag, as absl itself reports it
    sys.exit(f"FATAL Flags parsing error: {e}")
  except (AttributeError, KeyError) as e:
    key = str(e).strip("\"'")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0]]
    sys.exit(f"FATAL Flags parsing error: unknown config key {key!r} in {' '.join(culprits)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax

  from md_jax.infra import sharding

  sharding.split_cpu_host(_CONFIG.value.get("cpu_devices", 0))
  if _DISTRIBUTED.value:
    if os.environ.get("JAX_PLATFORMS") == "cpu":
      # CPU processes exchange collectives over gloo (TCP); TPUs and GPUs use their own links.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
    logging.info("Process %d of %d", jax.process_index(), jax.process_count())

  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config_utils.config_to_json(config) + "\n")
  logging.info("Stage %s, workdir %s", config.stage, workdir)
  run = main_job.run if config.stage == "main" else stages.run_stage
  result = run(config, str(workdir))
  if result is not None and jax.process_index() == 0:
    print(json.dumps(result))
  if result and "stopped_in" in result:  # saved and stopped early: a scheduler should rerun it
    sys.exit(stages.EXIT_TO_RESUME)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""Entry point for every md_jax job.

    python -m md_jax.main --config=configs/<stage>.py[:variant] --workdir=DIR [--config.a.b=v ...]

The config names its stage. Its values are checked first (`training/preflight.py`); only then is
the resolved config written to `<workdir>/config.json`, an earlier, different one kept as
`config.<N>.json`. An error the user can cause (a config value, a path, a checkpoint) ends the
run with status 1 and one last stderr line `FATAL <message>` naming it, the traceback in
`<workdir>/error.log` (`--verbose`: on stderr instead; see `md_jax/cli_errors.py`). A run
stopped by SIGTERM, Ctrl-C or preemption saves, prints where it stopped and exits with status 75
(`stages.EXIT_TO_RESUME`): rerun the same command to resume.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from md_jax import cli_errors, config_utils, job_checks, main_job, stages

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
cli_errors.define_verbose_flag()


def parse_flags(argv):
  """absl's parser; a config file that fails to load or a bad `--config.<key>` is one FATAL line
  naming it (`cli_errors.parse_flags`)."""
  return cli_errors.parse_flags(argv, config_flag="config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax

  from md_jax.infra import distributed, sharding

  sharding.split_cpu_host(_CONFIG.value.get("cpu_devices", 0))
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("Process %d of %d", jax.process_index(), jax.process_count())

  config = _CONFIG.value
  # epath, not pathlib: `gs://BUCKET/md` must stay one bucket for every host of a pod, not
  # become `gs:/BUCKET/md` on each host's local disk.
  workdir = main_job.workdir_path(_WORKDIR.value, absolute=False)
  job_checks.check_writable(workdir)
  stage = job_checks.check_job(config, workdir)
  if jax.process_index() == 0:  # only a config that passed its checks; an earlier one is kept
    config_utils.record_config(config, workdir)
  logging.info("Stage %s, workdir %s", config.stage, workdir)
  if config.stage == "main":
    result = main_job.run(config, str(workdir))
  else:
    result = stages.run_stage(config, str(workdir), stage)
  if result is not None and jax.process_index() == 0:
    print(json.dumps(result))
  if result and "stopped_in" in result:  # saved and stopped early: a scheduler should rerun it
    sys.exit(stages.EXIT_TO_RESUME)


if __name__ == "__main__":
  cli_errors.run(main, log_dir=lambda: _WORKDIR.value, flags_parser=parse_flags)

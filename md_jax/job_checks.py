"""What `md_jax.main` checks before a run writes anything: that the workdir takes files, and
that the job's configs pass the preflight (`training/preflight.py`). Apart from `main.py`, which
defines absl flags on import, so that tests and other programs can call them."""

import pathlib
import tempfile
import uuid

from etils import epath

from md_jax import cli_errors, main_job, stages


def check_writable(workdir) -> None:
  """The workdir exists (made here) and takes files, or one error naming it. A `gs://` one is
  made and probed through epath, a small file written and deleted there."""
  if main_job.is_remote(workdir):
    probe = epath.Path(workdir) / f".md_jax_write_probe.{uuid.uuid4().hex}"  # one per host
    try:
      probe.parent.mkdir(parents=True, exist_ok=True)
      probe.write_text("md_jax write probe\n")
      probe.unlink()
    except Exception as e:  # tf.io.gfile's errors (PermissionDenied, NotFound) are no OSErrors
      raise PermissionError(
        f"--workdir={str(workdir)!r} is not a writable directory: {type(e).__name__}: "
        f"{cli_errors.one_line(e)}"
      ) from e
    return
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise PermissionError(f"--workdir={str(workdir)!r} is not a writable directory: {e}") from e


def check_job(config, workdir: epath.Path):
  """Preflight of the run (`training/preflight.py`), before any config.json is written: the
  stage's config, or every unfinished stage's of a main job (each against the configs of the
  stages before it, whose runs may not exist yet). Returns the stage object to run, if any."""
  from md_jax.infra import checkpoints, phases
  from md_jax.training import preflight

  if config.stage != "main":
    preflight.check_config(config, stages.stage_class(config.stage), workdir=workdir)
    stage = stages.build_stage(config)  # its constructor checks what it reads, by name
    if stage is not None and checkpoints.completed_step(workdir) is None:
      preflight.check_init_checkpoint(config, stage)  # what only the built stage knows
    return stage
  unknown = [name for name in config.order if name not in config.stages]
  if unknown:
    raise ValueError(f"config.order names {unknown}, which config.stages does not define")
  upcoming = {}
  root = main_job.workdir_path(workdir)  # absolute; `gs://...` kept (epath's absolute() folds it)
  for name in config.order:
    stage_config = main_job.resolve_workdir(config.stages[name], root)
    stage_dir = root / name
    done = checkpoints.completed_step(stage_dir)
    if done is None or done < phases.final_step(stage_config):
      try:
        cls = stages.stage_class(stage_config.stage)
        preflight.check_config(stage_config, cls, workdir=stage_dir, upcoming=upcoming)
      except (ValueError, OSError) as e:
        raise ValueError(f"config.stages.{name}: {cli_errors.one_line(e)}") from e
    upcoming[str(stage_dir)] = stage_config
  return None

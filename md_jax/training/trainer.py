"""The training loop every stage shares: sharded init, resume, phases, checkpoints, logging.

A stage is a `training.stage.Stage`, pure functions and hooks; this module owns everything around
them:

  * parameters are created already sharded: `jax.eval_shape(stage.init_state)` → logical axes →
    `NamedSharding`s → `jax.jit(init, out_shardings=...)`, never materialised on one device;
  * the step is `jax.jit(stage.train_step)` with explicit in/out shardings and the state donated;
  * resume: the workdir's newest intact checkpoint (state, data position, phase; checksums
    verified, a corrupt one set aside as `<step>.corrupt`) or `config.restore_step` — a failed
    restore raises, it never silently starts afresh; or a new stage starts from another stage's
    checkpoint (`config.init_checkpoint`) through `stage.initialize_from`;
  * phases: progressive training (e.g. 256 px then 512 px, Sec. 5.1) switches pipeline, batch size
    and compiled step by itself, keeping params and optimizer state; `stage.begin_phase` may
    change the state as a phase starts (step distillation's rounds: the student becomes the
    teacher), and a stage that `keeps_phase_checkpoints` keeps each phase's last checkpoint;
  * config values checked before anything compiles (`preflight.py`);
  * checkpoints every `checkpoint_every` steps, at each phase end, at the end, and on SIGTERM or
    Ctrl-C, every way out finishing the save in flight; clu metric writers (TensorBoard on
    process 0), ReportProgress, a NaN guard naming the step, and periodic sample grids from
    `stage.sample_images`.
"""

import contextlib
import dataclasses
import logging
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath

from md_jax import visualize
from md_jax.data import tokenizer
from md_jax.data.pipeline import create_input_iterator
from md_jax.evaluation import periodic
from md_jax.infra import checkpoints, sharding
from md_jax.infra.phases import Phase, final_step, phases_from_config
from md_jax.training import preflight
from md_jax.training.stage import Stage


class _StopSignals:
  """Turns SIGTERM (preemption, `kill`) and, in a single-process run, SIGINT (Ctrl-C) into a flag
  the loop checks between steps: it saves a checkpoint and stops. A second Ctrl-C stops at once
  (KeyboardInterrupt). Across hosts a Ctrl-C reaches one process only, and the save is a
  collective: there it stays a KeyboardInterrupt (pods stop through SIGTERM and Orbax's
  preemption notice, which every process sees)."""

  def __init__(self):
    self.received = False

  def __enter__(self):
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGTERM,)
    self._previous = {s: signal.signal(s, self._handle) for s in signals}
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("%s received: saving a checkpoint and stopping", signal.Signals(signum).name)
    self.received = True

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass
class _Run:
  """What every phase of one run shares."""

  config: Any
  stage: Stage
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  rules: tuple
  shardings: Any
  checkpointer: checkpoints.Checkpointer
  writer: Any
  report: Any
  stop_signals: _StopSignals
  last_step: int
  evals: Any  # `config.evals` (`periodic.PeriodicEvals`)
  # One jitted step per batch layout: phases of the same resolution and batch size (distillation
  # rounds) reuse the compiled program instead of compiling it again.
  train_steps: dict = dataclasses.field(default_factory=dict)


def train_and_evaluate(config, workdir: str, stage: Stage):
  """Runs (or resumes) `stage` to `config.total_steps` or its phases' end; returns the state."""
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.logical_axis_rules)
  phases = phases_from_config(config)
  last_step = final_step(config)
  preflight.check_config(config, stage, workdir=workdir)  # before anything compiles
  evals = periodic.PeriodicEvals(config, workdir, mesh, rules)
  checkpointer = checkpoints.Checkpointer(
    workdir / "checkpoints", max_to_keep=config.get("max_checkpoints_to_keep", 3),
    keep_steps=[p.end_step for p in phases] if stage.keeps_phase_checkpoints else (),
  )  # fmt: skip
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() != 0)
  # Init runs outside the mesh context: shardings come from `out_shardings`, and flax's per-param
  # constraints would otherwise hit kernels that are initialised flat and reshaped (DenseGeneral).
  with nn.logical_axis_rules(rules), _StopSignals() as stop_signals, _closing(checkpointer, writer):
    rng = jax.random.key_data(jax.random.key(config.seed))
    abstract, shardings, init = sharding.create_sharded_state(stage.init_state, rng, mesh, rules)
    state, data_state = _restore_or_initialize(
      config, stage, checkpointer, abstract, shardings, init
    )
    step = int(jax.device_get(state.step))
    report = periodic_actions.ReportProgress(
      num_train_steps=last_step, writer=writer, every_secs=config.get("report_every_secs", 30)
    )
    run = _Run(
        config, stage, workdir, mesh, rules, shardings, checkpointer, writer, report, stop_signals,
        last_step, evals,
    )  # fmt: skip
    if step >= last_step:
      logging.info("Nothing to do: the checkpoint is at step %d of %d", step, last_step)
    for phase_index, phase in enumerate(phases):
      if step >= phase.end_step:
        continue
      if step >= last_step or stop_signals.received:
        break
      with jax.set_mesh(mesh):  # activations' logical constraints resolve against this mesh
        state, step = _run_phase(run, state, step, phase_index, phase, data_state)
      data_state = None  # only the phase the run resumed in restores a data position
  return state


@contextlib.contextmanager
def _closing(checkpointer: checkpoints.Checkpointer, writer):
  """Every way out of a run finishes the save in flight and closes the writers, so the newest
  checkpoint is complete (or absent) and a run that failed ends on its own error, not on a
  writer's: one raised while closing after that error is logged, and the error goes on."""
  try:
    yield
  except BaseException:
    try:
      checkpointer.wait_until_finished()
      checkpointer.close()
      writer.flush()
    except BaseException:  # a full disk, or a second Ctrl-C abandoning the save: said, not raised
      logging.exception("closing the checkpointer after the error below failed too")
    raise
  checkpointer.wait_until_finished()
  checkpointer.close()
  writer.flush()


def _restore_or_initialize(config, stage, checkpointer, abstract, shardings, init):
  restored = _restore(checkpointer, abstract, config.get("restore_step"))
  if restored is not None:
    return restored
  state = init(jax.random.key_data(jax.random.key(config.seed)))
  loaded = stage.load_pretrained(state)  # e.g. CLIP weights, a VAE
  if loaded is not state:
    state = _place(loaded, shardings)
  source = config.get("init_checkpoint")
  if source:
    tree, source_step = checkpoints.load_state_tree(source)
    logging.info("Initialising from %s (step %d)", source, source_step)
    state = _place(stage.initialize_from(state, tree), shardings)
  return state, None


def _restore(checkpointer, abstract, restore_step: int | None):
  """(state, data position) from the newest checkpoint that reads back what was saved, or None
  when there is none yet.

  A corrupt one (checksums, unreadable files) is set aside as `<step>.corrupt`, said in one line,
  and the one before is tried; a checkpoint that does not fit this model is not corruption and
  raises at once. With `restore_step`, exactly that checkpoint: newer ones are set aside as
  `<step>.superseded` so that the run's next saves are its latest.
  """
  steps = checkpointer.all_steps()
  if restore_step is not None:
    if restore_step not in steps:
      raise ValueError(
        f"config.restore_step={restore_step}: {checkpointer.directory} holds steps {steps}"
      )
    state = checkpointer.restore(restore_step, abstract)
    for newer in [s for s in steps if s > restore_step]:
      moved = checkpointer.set_aside(newer, "superseded")
      logging.warning("config.restore_step=%d: set %s aside", restore_step, moved)
    logging.info("Resuming from %s/%d (config.restore_step)", checkpointer.directory, restore_step)
    return state
  failures = []
  for step in reversed(steps):
    try:
      state = checkpointer.restore(step, abstract)
    except checkpoints.CorruptCheckpointError as e:
      failures.append(str(e))
      logging.error("%s; trying the checkpoint before it", e)
      continue
    for bad in steps[len(steps) - len(failures) :]:
      moved = checkpointer.set_aside(bad, "corrupt")
      logging.warning("Set the corrupt checkpoint %s aside; resuming from step %d", moved, step)
    logging.info("Resuming from %s/%d", checkpointer.directory, step)
    return state
  if failures:  # nothing intact: never start afresh over a run's history
    raise checkpoints.CorruptCheckpointError(
      f"no checkpoint in {checkpointer.directory} reads back intact; the newest: {failures[0]}"
    )
  return None


def _place(state, shardings):
  """Copies `state` onto its shardings, every leaf in a buffer of its own that XLA owns.

  The step donates its input. A state built on the host can hold one array in two places (EMA
  initialised to the params; a generator and a discriminator from the same weights) or alias
  numpy memory (a CPU `device_put`); donating such a buffer twice, or one numpy owns, crashes
  the process. So repeated leaves are copied first, and nothing is aliased.
  """
  seen = set()

  def distinct(x):
    if id(x) in seen:
      return np.array(x)
    seen.add(id(x))
    return x

  return jax.device_put(jax.tree.map(distinct, state), shardings, may_alias=False)


def _run_phase(run: _Run, state, step: int, phase_index: int, phase: Phase, data_state):
  config = run.config
  data_config = config.data.copy_and_resolve_references()
  data_config.resolution = phase.resolution
  data_config.tokenizer_dir = tokenizer.tokenizer_dir_of(config)[0]  # the text encoder's own
  iterator = create_input_iterator(
    data_config, global_batch_size=phase.global_batch_size, mesh=run.mesh, rules=run.rules,
    cached_latents=_cached_latents(config),
  )  # fmt: skip
  if data_state is not None and data_state["phase"] == phase_index:
    iterator.set_state(data_state["iterator"])
  begun = run.stage.begin_phase(state, phase_index)
  if begun is not state:  # e.g. a distillation round's new teacher
    state = _place(begun, run.shardings)
  end = min(phase.end_step, run.last_step)
  logging.info(
      "Phase %d: %d px, global batch %d, steps %d to %d",
      phase_index, phase.resolution, phase.global_batch_size, step, end,
  )  # fmt: skip

  train_step = None
  pending = None  # (step, metrics) of the step before the one in flight: checked for NaN lazily
  history = []
  last_log = (step, time.perf_counter())
  checkpoint_every = config.get("checkpoint_every", 1000)
  log_every = config.get("log_every", 50)
  sample_every = config.get("sample_every", 0)
  try:
    while step < end:
      batch = next(iterator)
      if train_step is None:  # once per phase: shapes change with the resolution
        batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
        layout = str(jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), batch))
        if layout not in run.train_steps:
          run.train_steps[layout] = sharding.jit_train_step(
            run.stage.train_step, run.shardings, batch_shardings
          )
        train_step = run.train_steps[layout]
      state, metrics = train_step(state, batch)
      step += 1
      # The previous step's loss is checked while this one runs: the device never waits on it.
      if pending is not None:
        history.append(_check_finite(*pending))
      pending = (step, metrics)
      run.report(step)
      stop = run.stop_signals.received or run.checkpointer.reached_preemption(step)
      save = stop or step % checkpoint_every == 0 or step == end
      if save or step % log_every == 0:
        history.append(_check_finite(*pending))
        pending = None
        _write_metrics(run.writer, step, history, phase, last_log)
        history, last_log = [], (step, time.perf_counter())
      if sample_every and step % sample_every == 0:
        _write_samples(run, state, batch, step)
      if step == run.last_step:
        batches = _in_order_batches(run, data_config, phase)
        try:
          state = run.stage.finalize(state, batches)
        finally:
          batches.close()
      if due := run.evals.due(step, run.last_step):
        run.evals.run(due, run.stage, state, step, run.writer)
      if save:
        data = {"phase": phase_index, "iterator": iterator.get_state()}
        run.checkpointer.save(step, state, data, config)
      if stop:
        break
  finally:
    iterator.close()
  return state, step


def _in_order_batches(run: _Run, data_config, phase: Phase):
  """The training split once, in order, unaugmented: what `stage.finalize` measures on."""
  iterator = create_input_iterator(
    data_config, global_batch_size=phase.global_batch_size, mesh=run.mesh, rules=run.rules,
    train=False, cached_latents=_cached_latents(run.config),
  )  # fmt: skip
  try:
    yield from iterator
  finally:
    iterator.close()


def _cached_latents(config) -> str:
  """`config.latents.cached`: the diffusion stage's precomputed latents, read instead of images."""
  latents = config.get("latents")
  return (latents.get("cached") or "") if latents is not None else ""


def _check_finite(step, metrics):
  metrics = jax.device_get(metrics)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(
      f"loss is {loss} at step {step}; stopping (the last checkpoint is intact)"
    )
  return metrics


def _write_metrics(writer, step, history, phase, last_log):
  """Means over the steps since the last log, and the throughput over them (compile included
  in the first interval of a phase, which is what a user waits for)."""
  scalars = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
  scalars["resolution"] = phase.resolution
  seconds = time.perf_counter() - last_log[1]
  scalars["images_per_s"] = (step - last_log[0]) * phase.global_batch_size / max(seconds, 1e-9)
  writer.write_scalars(step, scalars)


def _write_samples(run: _Run, state, batch, step):
  start = time.perf_counter()
  images = run.stage.sample_images(state, batch)
  if images is None:
    return
  images = np.asarray(jax.device_get(images))
  if jax.process_index() == 0:
    grid = visualize.make_grid(images)
    run.writer.write_images(step, {"samples": grid[None]})
    visualize.save_png(grid, run.workdir / "samples" / f"{step:08d}.png")
  logging.info("Wrote samples at step %d in %.1fs", step, time.perf_counter() - start)

"""The shared trainer on the tiny diffusion stage: sharding, exact resume, phases, failures."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from md_jax import config_utils, stages
from md_jax.infra import checkpoints
from md_jax.training import diffusion, trainer

REPO = pathlib.Path(__file__).parents[1]


def _config(data_dir, **overrides):
  config = config_utils.load_config(REPO / "configs/diffusion.py:tiny")
  config.data.dataset = "shapes/r32_small"
  config.data.data_dir = data_dir
  config.data.num_threads = 2
  # Two short phases: 16 px then 32 px (latents 4×4 then 8×8), batch 16 then 8.
  config.progressive.resolutions = (16, 32)
  config.progressive.batch_sizes = (16, 8)
  config.progressive.steps = (4, 3)
  config.data.resolution = 16
  config.global_batch_size = 16
  config.checkpoint_every = 2
  config.log_every = 1
  config.report_every_secs = 1000
  config.mesh.data, config.mesh.fsdp = 2, 4
  return _override(config, overrides)


def _override(config, overrides: dict):
  """`config` with each dotted key ("a.b.c") of `overrides` set to its value."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _train(config, workdir):
  return trainer.train_and_evaluate(config, str(workdir), diffusion.DiffusionStage(config))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_bitwise_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_resume_is_bitwise_equal_to_an_uninterrupted_run_across_the_phase_switch(
  shapes_data_dir, tmp_path
):
  straight = _host(_train(_config(shapes_data_dir), tmp_path / "straight"))
  assert int(straight.step) == 7

  resumed_dir = tmp_path / "resumed"
  # Stops in phase 1, after switching resolution and batch size within the run...
  state = _train(_config(shapes_data_dir, total_steps=5), resumed_dir)
  assert int(state.step) == 5
  manager = checkpoints.Checkpointer(resumed_dir / "checkpoints")
  assert manager.latest_step() == 5
  manager.close()
  data = json.loads((resumed_dir / "checkpoints/5/data/metadata").read_text())
  assert data["phase"] == 1
  # ... and resumes there: same phase, same data position.
  resumed = _host(_train(_config(shapes_data_dir), resumed_dir))  # to the end of phase 1

  _assert_bitwise_equal(straight.unet.params, resumed.unet.params)
  _assert_bitwise_equal(straight.unet.opt_state, resumed.unet.opt_state)
  _assert_bitwise_equal(straight.unet.ema_params, resumed.unet.ema_params)


def test_one_device_and_eight_sharded_devices_train_the_same(shapes_data_dir, tmp_path):
  overrides = {"progressive.steps": (3, 0), "progressive.resolutions": (16, 32)}
  sharded = _host(_train(_config(shapes_data_dir, **overrides), tmp_path / "sharded"))
  single_config = _config(shapes_data_dir, **overrides)
  single_config.mesh.data, single_config.mesh.fsdp, single_config.mesh.num_devices = 1, 1, 1
  single = _host(_train(single_config, tmp_path / "single"))
  diffs = jax.tree.map(
    lambda a, b: float(np.max(np.abs(a - b))), sharded.unet.params, single.unet.params
  )
  assert max(jax.tree.leaves(diffs)) <= 1e-5
  assert int(sharded.step) == int(single.step) == 3


def test_checkpoint_of_another_model_fails_naming_the_parameter(shapes_data_dir, tmp_path):
  _train(_config(shapes_data_dir, total_steps=2), tmp_path)
  wider = _config(shapes_data_dir, total_steps=4)
  wider.model.channels = (32, 96)
  with pytest.raises(
    ValueError, match=r"has config.model.channels=\(32, 64\), this run \(32, 96\)"
  ):
    _train(wider, tmp_path)  # the preflight, from the saved config, before anything compiles

  # And the restore itself, for what the preflight does not compare: each array by name.
  manager = checkpoints.Checkpointer(tmp_path / "other", async_save=False)
  manager.save(1, {"params": {"w": jnp.ones((2, 3))}}, {}, ml_collections.ConfigDict())
  wide = {"params": {"w": jax.ShapeDtypeStruct((2, 4), jnp.float32, sharding=_one_device())}}
  with pytest.raises(checkpoints.CheckpointError, match=r"shape mismatch \(1\): .*params.*w"):
    manager.restore(1, wide)
  manager.close()


def _one_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_a_stage_that_starts_from_another_run_needs_its_init_checkpoint(shapes_data_dir, tmp_path):
  config = _config(shapes_data_dir)
  config.stage = "relu_finetune"
  with pytest.raises(ValueError, match=r"init_checkpoint is empty; it must name the softmax diff"):
    _train(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("checkpoint_every", 0, r"config.checkpoint_every=0: expected an integer ≥ 1"),
    ("log_every", -5, r"config.log_every=-5: expected an integer ≥ 1"),
    ("sample_every", -1, r"config.sample_every=-1: expected an integer ≥ 0"),
  ],
)
def test_bad_intervals_are_named_before_anything_compiles(shapes_data_dir, tmp_path, key, value,
                                                          message):  # fmt: skip
  with pytest.raises(ValueError, match=message):
    _train(_config(shapes_data_dir, **{key: value}), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


class _NanFromStep3(diffusion.DiffusionStage):
  def train_step(self, state, batch):
    state_after, metrics = super().train_step(state, batch)
    metrics["loss"] = jnp.where(state.step >= 2, jnp.nan, metrics["loss"])
    return state_after, metrics


def test_nan_loss_stops_the_run_naming_the_step_and_the_save_in_flight_completes(
  shapes_data_dir, tmp_path
):
  # Step 2's checkpoint is written asynchronously while step 3 runs and its loss comes back NaN.
  config = _config(shapes_data_dir, total_steps=5)
  with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
    trainer.train_and_evaluate(config, str(tmp_path), _NanFromStep3(config))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # no partial save
  tree, step = checkpoints.load_state_tree(str(tmp_path))
  assert step == 2 and int(tree["unet"]["step"]) == 2


def test_init_from_another_checkpoint_starts_a_new_stage_from_its_params(shapes_data_dir, tmp_path):
  source = _host(_train(_config(shapes_data_dir, total_steps=2), tmp_path / "softmax"))
  relu = _config(shapes_data_dir, total_steps=1)
  relu.model.attention_fn = "relu"
  relu.init_checkpoint = str(tmp_path / "softmax")
  relu.optimizer.lr = 0.0  # one step that changes nothing: what is restored is what we see
  relu.ema_decay = 1.0
  state = _host(_train(relu, tmp_path / "relu"))
  assert int(state.step) == 1
  _assert_bitwise_equal(source.unet.ema_params, state.unet.params)
  _assert_bitwise_equal(source.text_encoder, state.text_encoder)


def _run_until_signalled(command, log, stop, when: str):
  """Runs `command`, sends `stop` once `when` is in its stderr, and returns (exit status, log)."""
  with open(log, "w") as stderr:
    process = subprocess.Popen(
      command, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=stderr, text=True
    )  # conftest's XLA flags and compilation cache: the step is compiled once per session
    deadline = time.time() + 600
    while time.time() < deadline and when not in log.read_text() and process.poll() is None:
      time.sleep(0.2)
    process.send_signal(stop)
    process.wait(timeout=300)
  return process.returncode, log.read_text()


def _cli_run(workdir, data_dir, *overrides):
  """`python -m md_jax.main` on the tiny diffusion config of `_config(progressive.steps=(6, 2))`,
  every step checkpointed."""
  return [
      sys.executable, "-m", "md_jax.main", "--config=configs/diffusion.py:tiny",
      f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
      "--config.data.dataset=shapes/r32_small", "--config.progressive.resolutions=(16,32)",
      "--config.progressive.batch_sizes=(16,8)", "--config.progressive.steps=(6,2)",
      "--config.data.resolution=16", "--config.global_batch_size=16",
      "--config.checkpoint_every=1", "--config.log_every=1", "--config.sample_every=0",
      "--config.data.num_threads=2", "--config.mesh.data=2", "--config.mesh.fsdp=4", *overrides,
  ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_cli_run(shapes_data_dir, tmp_path_factory):
  """(state tree, step) of the run `_cli_run` describes, trained straight through in-process: what
  every signal case's resumed run must equal, trained once for both."""
  workdir = tmp_path_factory.mktemp("straight")
  _train(_config(shapes_data_dir, checkpoint_every=1, **{"progressive.steps": (6, 2)}), workdir)
  return checkpoints.load_state_tree(str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize(
  "stop, when",
  [(signal.SIGINT, "Phase 0"), (signal.SIGTERM, "[2] ")],
  ids=["ctrl_c-while_compiling", "sigterm-while_saving"],
)
def test_a_signal_saves_exits_asking_to_be_resumed_and_the_resumed_run_is_bitwise_equal(
  shapes_data_dir, uninterrupted_cli_run, tmp_path, stop, when
):
  """`Phase 0` is logged before the first step compiles; from step 2 on, a save is always in
  flight (every step is checkpointed). Each signal and each moment once: both signals set the
  same flag (`trainer._StopSignals`), so the other two pairings would repeat these paths."""
  command = _cli_run(tmp_path / "run", shapes_data_dir)
  status, output = _run_until_signalled(command, tmp_path / "stderr.txt", stop, when)
  assert status == stages.EXIT_TO_RESUME, output[-3000:]
  assert f"{stop.name} received" in output
  stopped_at = checkpoints.completed_step(tmp_path / "run")
  assert stopped_at is not None and stopped_at < 8
  _, step = checkpoints.load_state_tree(str(tmp_path / "run"))  # complete, and verified
  assert step == stopped_at

  resumed = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  a, step_a = checkpoints.load_state_tree(str(tmp_path / "run"))
  b, step_b = uninterrupted_cli_run
  assert step_a == step_b == 8
  _assert_bitwise_equal(a, b)


@pytest.mark.slow
def test_a_run_that_diverges_ends_on_its_error_and_its_checkpoints_stay_whole(
  shapes_data_dir, tmp_path
):
  """A learning rate of 1e38 makes step 2's loss NaN while step 1's save is in flight: the run
  ends with status 1 and that error as its last line, no traceback, the save complete."""
  command = _cli_run(
    tmp_path, shapes_data_dir, "--config.optimizer.lr=1e38", "--config.optimizer.warmup_steps=0"
  )
  run = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL loss is nan at step "), last
  assert "Traceback" in (tmp_path / "error.log").read_text()
  saved = [p.name for p in (tmp_path / "checkpoints").iterdir()]
  assert all(name.isdigit() for name in saved) and saved  # nothing half-written beside them
  _, step = checkpoints.load_state_tree(str(tmp_path))  # complete, and verified
  assert step == int(last.split("at step ")[1].split(";")[0]) - 1


def test_relative_workdir_and_init_checkpoint_paths_work(shapes_data_dir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _train(_config(shapes_data_dir, total_steps=2, checkpoint_every=1), "relative/run")
  assert checkpoints.resolve_checkpoint("relative/run")[1] == 2
  tree, step = checkpoints.load_state_tree("relative/run/checkpoints/2")
  assert step == 2 and int(tree["unet"]["step"]) == 2


def test_checkpoint_without_a_newer_empty_state_field_fails_naming_the_checkpoint(tmp_path):
  """A state field with no arrays (e.g. the diffusion state's `representation_encoder` when off)
  that a checkpoint predates: every array matches, and the restore still fails in one line naming
  the checkpoint."""
  manager = checkpoints.Checkpointer(tmp_path / "checkpoints", async_save=False)
  old = {"params": {"w": jnp.ones((2, 3))}}
  manager.save(1, old, {"position": 1}, ml_collections.ConfigDict({"stage": "test"}))
  newer = {**old, "classifier": {}}
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), newer
  )
  with pytest.raises(
    checkpoints.CheckpointError, match=r"checkpoints/1 could not be restored.*classifier"
  ) as e:
    manager.restore(1, abstract)
  assert "\n" not in str(e.value)
  state, data = manager.restore(1, {"params": abstract["params"]})  # the same tree restores
  np.testing.assert_array_equal(state["params"]["w"], old["params"]["w"])
  assert data == {"position": 1}
  manager.close()

"""Two processes on localhost (jax.distributed, gloo) train exactly like one process."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from md_jax.infra import checkpoints
from md_jax.training import diffusion, trainer
from tests.test_trainer import _config

REPO = pathlib.Path(__file__).parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(shapes_data_dir, tmp_path):
  overrides = [
    "--config=configs/diffusion.py:tiny",
    "--config.data.dataset=shapes/r32_small",
    f"--config.data.data_dir={shapes_data_dir}",
    "--config.data.num_threads=2",
    "--config.progressive.resolutions=(16,32)",
    "--config.progressive.batch_sizes=(16,8)",
    "--config.progressive.steps=(3,0)",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
    "--config.log_every=1",
  ]
  port = _free_port()
  # Four devices per process (8 in all); conftest's other XLA flags and compilation cache stay.
  xla_flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  processes = [
      subprocess.Popen(
          [
              sys.executable, "-m", "md_jax.main", *overrides, f"--workdir={tmp_path / 'two'}",
              "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}",
          ],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]  # fmt: skip
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-4000:]

  config = _config(shapes_data_dir, **{"progressive.steps": (3, 0)})
  one = trainer.train_and_evaluate(config, str(tmp_path / "one"), diffusion.DiffusionStage(config))
  two, step = checkpoints.load_state_tree(str(tmp_path / "two"))
  assert step == 3
  diffs = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
    jax.device_get(one.unet.params),
    two["unet"]["params"],
  )
  assert max(jax.tree.leaves(diffs)) <= 1e-5

"""Two processes on localhost (jax.distributed, gloo) train exactly like one process, on `shapes`
and on users' webdataset shards ingested by `md_jax.data.ingest`."""

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


def _webdataset_from_shapes(shapes_data_dir, root: pathlib.Path, shards=2, per_shard=32):
  """Tar shards as img2dataset writes them (KEY.png + KEY.txt), from `shapes` examples."""
  import io
  import tarfile

  from PIL import Image

  from md_jax.data.prepare import prepare_dataset

  source = prepare_dataset("shapes/r32_small", shapes_data_dir).as_data_source("train")
  root.mkdir(parents=True)
  for shard in range(shards):
    with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
      for i in range(per_shard):
        example = source[shard * per_shard + i]
        png = io.BytesIO()
        Image.fromarray(np.asarray(example["image"])).save(png, format="PNG")
        caption = example["caption"]
        caption = caption.decode() if isinstance(caption, bytes) else str(caption)
        for suffix, data in (("png", png.getvalue()), ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{suffix}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


def _ingested(shapes_data_dir, tmp_path) -> tuple[str, str]:
  """(dataset name, data dir): users' webdataset shards, ingested by `md_jax.data.ingest`."""
  from md_jax.data import ingest

  _webdataset_from_shapes(shapes_data_dir, tmp_path / "tars")
  ingest.ingest(str(tmp_path / "tars"), "user_images", str(tmp_path / "tfds"), workers=2)
  return "user_images", str(tmp_path / "tfds")


@pytest.mark.slow
def test_two_processes_on_ingested_shards_equal_one_process(shapes_data_dir, tmp_path):
  # Users' own data is what a pod reads; the embedded `shapes` takes the same TFDS, Grain and
  # `jax.distributed` route (a second 2-process case cost ~70 s of the suite).
  dataset, data_dir = _ingested(shapes_data_dir, tmp_path)
  overrides = [
    "--config=configs/diffusion.py:tiny",
    f"--config.data.dataset={dataset}",
    f"--config.data.data_dir={data_dir}",
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

  config = _config(data_dir, **{"progressive.steps": (3, 0), "data.dataset": dataset})
  one = trainer.train_and_evaluate(config, str(tmp_path / "one"), diffusion.DiffusionStage(config))
  two, step = checkpoints.load_state_tree(str(tmp_path / "two"))
  assert step == 3
  diffs = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
    jax.device_get(one.unet.params),
    two["unet"]["params"],
  )
  assert max(jax.tree.leaves(diffs)) <= 1e-5

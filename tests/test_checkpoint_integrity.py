"""Checkpoints that cannot load wrong numbers: checksums written with every save and verified on
every restore, corrupt checkpoints set aside, and runs that resume from the newest intact one."""

import pathlib
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from md_jax.infra import checkpoints, fingerprints
from tests.test_trainer import _assert_bitwise_equal, _config, _host, _train


def test_sharded_fingerprints_equal_the_host_ones_and_see_any_change():
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  tree = {
    "f32": rng.normal(size=(8, 12)).astype(np.float32),
    "bf16": rng.normal(size=(4, 8, 6)).astype(jnp.bfloat16),
    "i32": rng.integers(-9, 9, size=(16,)).astype(np.int32),
    "u8": rng.integers(0, 255, size=(8, 4)).astype(np.uint8),
    "flag": np.array([True, False, True, True]),
    "scalar": np.float32(3.5),
  }
  specs = {"f32": P("data", "fsdp"), "bf16": P(None, "fsdp"), "i32": P("fsdp"), "u8": P("data"),
           "flag": P("fsdp"), "scalar": P()}  # fmt: skip
  sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
  expected = fingerprints.of_host_tree(tree)
  assert fingerprints.of_device_tree(sharded) == expected
  assert fingerprints.of_device_tree(jax.device_put(tree, jax.devices()[0])) == expected

  changed = dict(tree, f32=tree["f32"].copy())
  changed["f32"][5, 7] = np.nextafter(changed["f32"][5, 7], np.float32(np.inf))  # one bit
  assert fingerprints.differences(expected, fingerprints.of_host_tree(changed)) == ["f32"]
  swapped = dict(tree, i32=tree["i32"][::-1].copy())  # same values, other places
  assert fingerprints.differences(expected, fingerprints.of_host_tree(swapped)) == ["i32"]


@pytest.fixture(scope="module")
def three_checkpoints(shapes_data_dir, tmp_path_factory):
  """A tiny diffusion run checkpointed at steps 1, 2 and 3, and its state at step 3."""
  workdir = tmp_path_factory.mktemp("three_checkpoints")
  config = _config(shapes_data_dir, total_steps=3, checkpoint_every=1)
  state = _host(_train(config, workdir))
  return config, workdir, state


def _abstract(config, state_like):
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  del config
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
    state_like,
  )


def _flip_one_bit(files, rng):
  """Flips one bit at a position drawn uniformly over all bytes of `files`; returns the file."""
  sizes = [f.stat().st_size for f in files]
  position = rng.randrange(sum(sizes))
  for path, size in zip(files, sizes):
    if position < size:
      data = bytearray(path.read_bytes())
      data[position] ^= 1 << rng.randrange(8)
      path.write_bytes(bytes(data))
      return path
    position -= size
  raise AssertionError("unreachable")


def test_one_flipped_bit_anywhere_in_the_arrays_never_loads_wrong_numbers(
  three_checkpoints, tmp_path
):
  config, workdir, state = three_checkpoints
  abstract = _abstract(config, state)
  rng = random.Random(0)
  detected, harmless = [], []
  for trial in range(20):  # 20 random flips, a restore (~2.5 s) each
    copy = tmp_path / str(trial)
    shutil.copytree(workdir / "checkpoints" / "3", copy / "3")
    files = sorted(f for f in (copy / "3" / "state").rglob("*") if f.is_file())
    flipped = _flip_one_bit(files, rng)
    checkpointer = checkpoints.Checkpointer(copy, async_save=False)
    try:
      restored, _ = checkpointer.restore(3, abstract)
    except checkpoints.CorruptCheckpointError as e:
      assert "\n" not in str(e) and str(copy / "3") in str(e)
      detected.append(flipped.name)
    else:  # a byte that restore never reads (e.g. a per-process b-tree merged into the root)
      _assert_bitwise_equal(_host(restored), state)
      harmless.append(str(flipped.relative_to(copy)))
    finally:
      checkpointer.close()
    shutil.rmtree(copy)
  print(
    f"{len(detected)} flips detected, {len(harmless)} harmless {harmless}, 0 loaded wrong numbers"
  )
  assert len(detected) >= 10, (detected, harmless)


def _corrupt(step_dir: pathlib.Path, seed: int) -> None:
  """Flips one bit of the arrays' bytes that restore reads (some bytes of a chunk file are never
  read back: flips there are redone until one is)."""
  files = sorted(f for f in (step_dir / "state").rglob("*") if f.is_file())
  rng = random.Random(seed)
  for _ in range(20):
    originals = {f: f.read_bytes() for f in files}
    _flip_one_bit(files, rng)
    try:
      checkpoints.load_state_tree(str(step_dir))
    except checkpoints.CorruptCheckpointError:
      return
    for f, data in originals.items():
      f.write_bytes(data)
  raise AssertionError(f"20 flips in {step_dir} were all harmless")


def test_init_from_a_corrupt_checkpoint_is_refused_naming_it(three_checkpoints, tmp_path):
  _, workdir, _ = three_checkpoints
  shutil.copytree(workdir / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
  _corrupt(tmp_path / "checkpoints" / "3", seed=1)
  with pytest.raises(checkpoints.CorruptCheckpointError, match="checkpoints/3 ") as e:
    checkpoints.load_state_tree(str(tmp_path))
  assert "\n" not in str(e.value)


def test_a_run_resumes_from_the_newest_intact_checkpoint_bitwise(
  shapes_data_dir, three_checkpoints, tmp_path
):
  _, workdir, _ = three_checkpoints
  shutil.copytree(workdir, tmp_path / "run")
  _corrupt(tmp_path / "run" / "checkpoints" / "3", seed=2)
  config4 = _config(shapes_data_dir, total_steps=4, checkpoint_every=1)
  resumed = _host(_train(config4, tmp_path / "run"))
  assert (tmp_path / "run" / "checkpoints" / "3.corrupt").is_dir()  # set aside, not deleted
  uninterrupted = _host(_train(config4, tmp_path / "uninterrupted"))
  _assert_bitwise_equal(resumed, uninterrupted)


def test_restore_step_resumes_from_an_older_checkpoint_setting_newer_ones_aside(
  shapes_data_dir, three_checkpoints, tmp_path
):
  _, workdir, _ = three_checkpoints
  shutil.copytree(workdir, tmp_path / "run")
  config = _config(shapes_data_dir, total_steps=3, checkpoint_every=1, restore_step=1)
  again = _host(_train(config, tmp_path / "run"))
  names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
  assert names == ["1", "2", "2.superseded", "3", "3.superseded"]
  _assert_bitwise_equal(again, three_checkpoints[2])  # steps 2 and 3 retrained alike

  with pytest.raises(ValueError, match=r"config.restore_step=7: .* holds steps \[1, 2, 3\]"):
    _train(_config(shapes_data_dir, total_steps=3, restore_step=7), tmp_path / "run")


def test_checkpoints_without_checksums_still_restore(three_checkpoints, tmp_path):
  """Runs checkpointed before checksums were recorded resume (unverified, with a warning)."""
  config, workdir, state = three_checkpoints
  shutil.copytree(workdir / "checkpoints" / "3", tmp_path / "3")
  shutil.rmtree(tmp_path / "3" / "checksums")
  checkpointer = checkpoints.Checkpointer(tmp_path, async_save=False)
  restored, _ = checkpointer.restore(3, _abstract(config, state))
  checkpointer.close()
  _assert_bitwise_equal(_host(restored), state)

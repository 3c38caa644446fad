"""A `gs://` workdir stays `gs://` through `md_jax.main` and the main job: `pathlib` would fold it
to `gs:/BUCKET/...`, a directory on each host's local disk.

No bucket is reached: `fake_gcs` serves `gs://` through epath's own test hook
(`epath.testing.mock_epath`) from a local folder, so a write that bypasses epath (pathlib, os,
tempfile) lands in the test's working directory instead, where the tests look for it.
"""

import json
import os
import pathlib

import ml_collections
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from md_jax import cli_errors, config_utils, job_checks, main_job

GS = "gs://bucket/md"
REPO = pathlib.Path(__file__).parents[1]


class FakeGcs:
  def __init__(self, root):
    self.root = root
    self.failures = {}  # backend operation -> the exception it raises


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """`gs://X` is `<tmp>/gcs/X` for epath; the test runs in the empty folder `<tmp>/cwd`."""
  root = tmp_path / "gcs"
  fake = FakeGcs(root)
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # With TensorFlow installed epath sends gs:// to tf.io.gfile whatever its backend table says.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

  def local(path):  # mock_epath serves local paths too, and its backend calls itself
    path = os.fspath(path)
    return str(root / path.removeprefix("gs://")) if path.startswith("gs://") else path

  def remote(path):
    return "gs://" + os.path.relpath(path, root)

  def serve(name, paths=1):
    def operation(original, *args, **kwargs):
      if name in fake.failures:
        raise fake.failures[name]
      args = [local(a) for a in args[:paths]] + list(args[paths:])
      if name == "open" and "r" not in args[1]:  # a bucket's "folders" are only name prefixes
        os.makedirs(os.path.dirname(args[0]), exist_ok=True)
      found = original(*args, **kwargs)
      return [remote(p) for p in found] if name == "glob" else found

    return operation

  ops = ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree", "stat")
  mocks = {name: serve(name) for name in (*ops, "glob")}
  mocks.update({name: serve(name, paths=2) for name in ("rename", "replace", "copy")})
  with epath_testing.mock_epath(**mocks):
    yield fake
  assert not any(cwd.iterdir()), f"written beside the cwd, not to gs://: {list(cwd.iterdir())}"


def test_workdir_path_keeps_a_gs_path_and_absolutises_a_local_one(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for given in (GS, GS + "/"):
    assert str(main_job.workdir_path(given)) == GS
    assert str(main_job.workdir_path(given, absolute=False)) == GS
  assert str(main_job.workdir_path(epath.Path(GS) / "vae")) == GS + "/vae"
  assert str(main_job.workdir_path("runs/x")) == str(tmp_path / "runs/x")
  assert str(main_job.workdir_path("runs/x", absolute=False)) == "runs/x"
  assert main_job.is_remote(GS) and not main_job.is_remote(tmp_path)
  with pytest.raises(ValueError, match="unsupported scheme"):
    main_job.workdir_path("memory://bucket/md")


def test_resolve_workdir_fills_in_the_gs_path_unchanged():
  stage = ml_collections.ConfigDict(
    {"init_checkpoint": "{workdir}/vae", "nested": {"path": "{workdir}/text"}, "n": 1}
  )
  for workdir in (GS, main_job.workdir_path(GS)):
    resolved = main_job.resolve_workdir(stage, workdir)
    assert resolved.init_checkpoint == GS + "/vae"
    assert resolved.nested.path == GS + "/text"
  assert stage.init_checkpoint == "{workdir}/vae"  # a copy


def test_check_writable_makes_and_probes_a_gs_workdir_through_epath(fake_gcs):
  job_checks.check_writable(main_job.workdir_path(GS, absolute=False))
  made = fake_gcs.root / "bucket/md"
  assert made.is_dir()
  assert list(made.iterdir()) == [], "the probe file was left behind"


def test_check_writable_names_a_gs_workdir_it_cannot_write(fake_gcs):
  class PermissionDeniedError(Exception):  # as tf.io.gfile's, which is no OSError
    pass

  fake_gcs.failures["open"] = PermissionDeniedError("403 caller lacks storage.objects.create")
  with pytest.raises(PermissionError, match=r"--workdir='gs://bucket/md' is not a writable.*403"):
    job_checks.check_writable(GS)


def test_check_writable_still_makes_a_local_workdir(tmp_path):
  workdir = tmp_path / "a/b"
  job_checks.check_writable(workdir)
  assert workdir.is_dir() and list(workdir.iterdir()) == []


def test_record_config_in_a_gs_workdir_keeps_an_earlier_config(fake_gcs):
  config = ml_collections.ConfigDict({"stage": "diffusion", "seed": 0})
  written = config_utils.record_config(config, epath.Path(GS))
  assert str(written) == GS + "/config.json"
  config.seed = 1
  config_utils.record_config(config, GS)
  names = sorted(p.name for p in (fake_gcs.root / "bucket/md").iterdir())
  assert names == ["config.1.json", "config.json"]
  seeds = [json.loads((fake_gcs.root / "bucket/md" / n).read_text())["seed"] for n in names]
  assert seeds == [0, 1]


def test_record_config_in_a_local_workdir_keeps_config_n_json(tmp_path):
  config = ml_collections.ConfigDict({"stage": "vae", "seed": 0})
  written = config_utils.record_config(config, str(tmp_path))
  assert str(written) == str(tmp_path / "config.json")
  for seed in (1, 2):
    config.seed = seed
    config_utils.record_config(config, tmp_path)
  config_utils.record_config(config, tmp_path)  # the same again: nothing new kept
  names = ["config.1.json", "config.2.json", "config.json"]  # and no config.json.partial
  assert sorted(p.name for p in tmp_path.iterdir()) == names
  assert [json.loads((tmp_path / n).read_text())["seed"] for n in names] == [0, 1, 2]


def test_error_log_is_not_written_for_a_gs_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  folded = tmp_path / "gs:/bucket/md"  # what the old pathlib workdir made on local disk
  folded.mkdir(parents=True)
  assert cli_errors._append_log(GS, "Traceback ...") is None
  assert cli_errors._append_log([GS, str(tmp_path)], "Traceback ...") == tmp_path / "error.log"
  assert list(folded.iterdir()) == []
  with pytest.raises(SystemExit):
    cli_errors.fatal("boom", detail="Traceback ...", log_dir=GS)


def test_check_job_of_the_main_job_keeps_the_gs_workdir(fake_gcs, monkeypatch):
  config = config_utils.load_config(REPO / "configs/main.py")
  filled = []

  def resolve_workdir(stage_config, workdir):
    filled.append(str(workdir))
    return resolve(stage_config, workdir)

  resolve = main_job.resolve_workdir
  monkeypatch.setattr(main_job, "resolve_workdir", resolve_workdir)
  # Each stage checked against the configs of those before it, found under gs://bucket/md/<stage>.
  assert job_checks.check_job(config, main_job.workdir_path(GS, absolute=False)) is None
  assert filled == [GS] * len(config.order)

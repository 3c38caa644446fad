"""Every bad input a user can give `md_jax.main`, `md_jax.generate` or `md_jax.export` ends the
program before anything compiles, with status 1 and one last stderr line `FATAL <message>` that
names the culprit, no traceback on stderr, and the workdir's checkpoints and config.json as they
were (issue 45).

Each case is a subprocess; they run two at a time in one module fixture (about 3 s each, mostly
imports), and each case's assertions are a test of their own.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from md_jax import cli_errors, config_utils
from md_jax.infra import checkpoints

REPO = pathlib.Path(__file__).parents[1]

# The tiny diffusion run of tests/test_trainer.py's `_config`, as flags.
BASE = {
  "config": "configs/diffusion.py:tiny",
  "config.data.dataset": "shapes/r32_small",
  "config.data.data_dir": "{data}",
  "config.data.num_threads": "2",
  "config.progressive.resolutions": "(16,32)",
  "config.progressive.batch_sizes": "(16,8)",
  "config.progressive.steps": "(4,3)",
  "config.checkpoint_every": "2",
  "config.log_every": "1",
  "config.mesh.data": "2",
  "config.mesh.fsdp": "4",
}


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  module: str
  args: tuple  # flags over BASE for md_jax.main (`key=None` drops one); a full list otherwise
  culprit: tuple[str, ...]  # all in the FATAL line, after `{placeholder}`s are filled in
  workdir: str | None = None  # a prepared run copied for this case: its files must not change
  # The config passes its checks (only the checkpoint is bad), so config.json may be written.
  config_is_good: bool = False


def main_case(id, overrides, culprit, workdir="{tmp}/fresh", copy=None, config_is_good=False):
  flags = {**BASE, "workdir": workdir, **overrides}
  args = tuple(f"--{k}={v}" for k, v in flags.items() if v is not None)
  return Case(id, "md_jax.main", args, culprit, copy, config_is_good)


CASES = [
  main_case("missing config file", {"config": "configs/nope.py"}, ("--config=configs/nope.py",)),
  main_case(
    "unknown config variant",
    {"config": "configs/diffusion.py:huge"},
    ("--config=configs/diffusion.py:huge", "unknown variant 'huge'"),
  ),
  main_case(
    "misspelt config key",
    {"config.optimzer.lr": "1"},
    ("--config.optimzer.lr=1", "'optimzer'", "did you mean 'optimizer'"),
  ),
  main_case(
    "unknown dataset", {"config.data.dataset": "nope/x"}, ("config.data.dataset='nope/x'",)
  ),
  main_case(
    "unknown dataset config",
    {"config.data.dataset": "shapes/r33"},
    ("config.data.dataset='shapes/r33'", "r32_small"),
  ),
  main_case(
    "missing tokenizer dir",
    {"config.data.tokenizer_dir": "{tmp}/no_tokenizer"},
    ("config.data.tokenizer_dir=", "no_tokenizer"),
  ),
  main_case(
    "nonexistent init_checkpoint",
    {"config.init_checkpoint": "{tmp}/nowhere"},
    ("config.init_checkpoint=", "nowhere", "does not exist"),
  ),
  main_case(
    "wrong-width init_checkpoint",
    {"config.init_checkpoint": "{diffusion}", "config.model.channels": "(32,96)"},
    ("config.init_checkpoint=", "config.model.channels=(32, 64)", "(32, 96)"),
  ),
  main_case(
    "a vae run as a diffusion init_checkpoint",
    {"config.init_checkpoint": "{vae}"},
    ("config.init_checkpoint=", "'vae' run", "DiffusionStage"),
  ),
  main_case(
    "resume with another width",
    {"config.model.channels": "(32,96)"},
    ("--workdir=", "config.model.channels=(32, 64)", "(32, 96)"),
    workdir="{copy}",
    copy="{diffusion}",
  ),
  main_case(
    "resume as another stage",
    {k: None for k in BASE if k.startswith("config.progressive")}
    | {"config": "configs/vae.py:tiny", "config.data.resolution": "32"},
    ("--workdir=", "is of a 'diffusion' run", "config.stage='vae'"),
    workdir="{copy}",
    copy="{diffusion}",
  ),
  main_case(
    "truncated checkpoint, nothing intact to resume from",
    {},
    ("checkpoints/2", "reads back intact"),
    workdir="{copy}",
    copy="{truncated}",
    config_is_good=True,
  ),
  main_case("read-only workdir", {}, ("--workdir=", "not a writable directory"), "{read_only}"),
  main_case(
    "checkpoint_every=0",
    {"config.checkpoint_every": "0"},
    ("config.checkpoint_every=0",),
    workdir="{copy}",
    copy="{diffusion}",
  ),
  main_case(
    "missing latent cache",
    {"config.latents.cached": "{tmp}/no_cache"},
    ("config.latents.cached=", "no_cache", "16 px cache", "is missing"),
  ),
  main_case(
    "log_every=-1", {"config.log_every": "-1"}, ("config.log_every=-1", "expected an integer")
  ),
  main_case(
    "batch not divisible by the mesh",
    {"config.progressive.batch_sizes": "(12,8)"},
    ("config.progressive.batch_sizes[0]=12", "8 batch shards"),
  ),
  main_case("mesh that does not fit the devices", {"config.mesh.data": "3"}, ("config.mesh",)),
  main_case(
    "resolution not divisible by the latent factor",
    {"config.progressive.resolutions": "(18,32)"},
    ("config.progressive.resolutions[0]=18", "latent factor 4"),
  ),
  main_case(
    "resolution the UNet cannot halve",
    {"config.progressive.resolutions": "(12,32)"},
    ("config.progressive.resolutions[0]=12", "config.model.channels"),
  ),
  Case(
    "a main-job stage's bad value",
    "md_jax.main",
    (
      "--config=configs/main.py:quick",
      "--workdir={tmp}/job",
      "--config.stages.diffusion.checkpoint_every=0",
    ),
    ("config.stages.diffusion", "config.checkpoint_every=0"),
  ),
  Case(
    "generate: saved config disagrees with the arrays",
    "md_jax.generate",
    ("--checkpoint={copy}", "--prompt=a red circle", "--steps=1"),
    ("--checkpoint=", "does not fit its arrays", "unet shape mismatch"),
    workdir="{disagreeing}",
  ),
  Case(
    "export: saved config disagrees with the arrays",
    "md_jax.export",
    ("--checkpoint={copy}", "--out={tmp}/export", "--programs=unet"),
    ("--checkpoint=", "does not fit its arrays"),
    workdir="{disagreeing}",
  ),
  Case(
    "generate: truncated checkpoint",
    "md_jax.generate",
    ("--workdir={copy}", "--prompt=a red circle", "--steps=1", "--out={tmp}/images"),
    ("--workdir=", "checkpoints/2"),
    workdir="{truncated}",
  ),
  Case(
    "generate: missing workdir",
    "md_jax.generate",
    ("--workdir={tmp}/nowhere", "--prompt=a red circle"),
    ("--workdir=", "nowhere", "does not exist"),
  ),
  Case(
    "generate: a vae checkpoint",
    "md_jax.generate",
    ("--checkpoint={vae}", "--prompt=a red circle"),
    ("--checkpoint=", "'vae' checkpoint"),
  ),
  Case(
    "generate: resolution not divisible by the latent factor",
    "md_jax.generate",
    ("--workdir={copy}", "--prompt=a red circle", "--resolution=30", "--steps=1"),
    ("--resolution=30", "latent factor"),
    workdir="{diffusion}",
  ),
  Case(
    "generate: misspelt flag",
    "md_jax.generate",
    ("--workdir={diffusion}", "--promt=a red circle"),
    ("'promt'", "prompt"),
  ),
  Case(
    "export: missing config file",
    "md_jax.export",
    ("--config=configs/nope.py", "--out={tmp}/export"),
    ("--config=configs/nope.py",),
  ),
]


def _read_only_dir(tmp: pathlib.Path) -> str:
  if os.geteuid() != 0:
    path = tmp / "read_only"
    path.mkdir()
    path.chmod(0o555)
    return str(path)
  if os.path.isdir("/sys"):  # root writes anywhere a mode allows; sysfs refuses it all the same
    return "/sys/md_jax_read_only_workdir"
  pytest.skip("no read-only directory for root here")


def _save(directory: pathlib.Path, tree, config) -> None:
  """A checkpoint of `tree` written as a run writes one (with its checksums)."""
  manager = checkpoints.Checkpointer(directory / "checkpoints", async_save=False)
  manager.save(2, jax.tree.map(jnp.asarray, tree), {"phase": 0}, config)
  manager.close()


@pytest.fixture(scope="module")
def prepared(shapes_data_dir, diffusion_run, tmp_path_factory):
  """The runs the cases point at: the 2-step tiny diffusion run; a checkpoint saved with the
  `vae:tiny` config; the diffusion run's arrays saved under a config that says another width."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  diffusion = tmp / "diffusion"  # the session's run is read only: this copy gets a config.json
  shutil.copytree(diffusion_run, diffusion)
  vae_config = config_utils.load_config(REPO / "configs/vae.py:tiny")
  _save(tmp / "vae", {"autoencoder": {"params": {"w": jnp.zeros((2, 2))}}}, vae_config)
  tree, _ = checkpoints.load_state_tree(str(diffusion_run))
  config = ml_collections.ConfigDict(checkpoints.saved_config(str(diffusion_run)))
  config.model.channels = (32, 96)
  _save(tmp / "disagreeing", tree, config)
  truncated = tmp / "truncated"  # its one checkpoint's largest array file cut in half
  shutil.copytree(diffusion_run, truncated)
  chunks = [f for f in (truncated / "checkpoints").rglob("*") if f.is_file() and "state" in f.parts]
  largest = max(chunks, key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  # A config.json beside the checkpoints, as `md_jax.main` leaves one: a failed run keeps it.
  saved = checkpoints.saved_config(str(diffusion))
  config_utils.record_config(ml_collections.ConfigDict(saved), diffusion)
  return {
    "data": shapes_data_dir,
    "diffusion": str(diffusion),
    "vae": str(tmp / "vae"),
    "disagreeing": str(tmp / "disagreeing"),
    "truncated": str(truncated),
    "read_only": _read_only_dir(tmp),
    "tmp": str(tmp),
  }


def _fingerprint(workdir: pathlib.Path) -> dict:
  """{relative path: sha256} of a run's checkpoints and config*.json files."""
  kept = []
  for path in workdir.rglob("*"):
    relative = path.relative_to(workdir)
    if path.is_file() and ("checkpoints" in relative.parts or path.name.startswith("config")):
      kept.append(path)
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}


def _checkpoint_files(workdir: pathlib.Path) -> dict:
  return {k: v for k, v in _fingerprint(workdir).items() if k.startswith("checkpoints")}


def _run(case: Case, prepared: dict, index: int) -> dict:
  places = dict(prepared)
  copy = None
  if case.workdir:  # a fresh copy per case: what one case writes cannot show up in another
    copy = pathlib.Path(prepared["tmp"]) / f"case_{index}"
    shutil.copytree(case.workdir.format(**prepared), copy)
    places["copy"] = str(copy)
  places["tmp"] = str(pathlib.Path(prepared["tmp"]) / f"case_{index}_tmp")
  args = [a.format(**places) for a in case.args]
  keep = _checkpoint_files if case.config_is_good else _fingerprint
  before = keep(copy) if copy else None
  process = subprocess.run(
    [sys.executable, "-m", case.module, *args],
    cwd=REPO,
    env=dict(os.environ),  # conftest's XLA flags and compilation cache
    capture_output=True,
    text=True,
    timeout=300,
  )
  return {
    "process": process,
    "culprit": [c.format(**places) for c in case.culprit],
    "before": before,
    "after": keep(copy) if copy else None,
  }


@pytest.fixture(scope="module")
def outcomes(prepared):
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
    futures = {c.id: pool.submit(_run, c, prepared, i) for i, c in enumerate(CASES)}
    return {id: future.result() for id, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_ends_in_one_line_naming_the_culprit(case, outcomes):
  outcome = outcomes[case.id]
  process = outcome["process"]
  stderr = process.stderr
  last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
  assert process.returncode == 1, stderr[-3000:]
  assert last.startswith("FATAL "), stderr[-3000:]
  for culprit in outcome["culprit"]:
    assert culprit in last, last
  assert "Traceback" not in stderr, stderr[-3000:]
  assert outcome["before"] == outcome["after"]  # checkpoints and config.json untouched


def test_verbose_prints_the_traceback_above_the_fatal_line_and_error_log_keeps_it(
  prepared, tmp_path
):
  flags = {**BASE, "workdir": str(tmp_path), "config.checkpoint_every": "0"}
  command = [sys.executable, "-m", "md_jax.main"]
  command += [f"--{k}={v}".format(**prepared) for k, v in flags.items()]
  quiet = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
  assert quiet.stderr.splitlines()[-2] == f"(details in {tmp_path / 'error.log'})"
  log = (tmp_path / "error.log").read_text()
  assert "Traceback" in log and "config.checkpoint_every=0" in log
  assert not (tmp_path / "config.json").exists()  # written only once the config passed
  verbose = subprocess.run(
    [*command, "--verbose"], cwd=REPO, env=dict(os.environ), capture_output=True, text=True
  )
  assert verbose.returncode == 1
  assert "Traceback" in verbose.stderr
  assert (
    verbose.stderr.splitlines()[-1] == "FATAL config.checkpoint_every=0: expected an integer ≥ 1"
  )


def test_record_config_keeps_an_earlier_config_that_differs(tmp_path):
  config = ml_collections.ConfigDict({"stage": "diffusion", "seed": 0})
  config_utils.record_config(config, tmp_path)
  config_utils.record_config(config, tmp_path)  # the same config: nothing kept twice
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
  config.seed = 1
  config_utils.record_config(config, tmp_path)
  config.seed = 2
  config_utils.record_config(config, tmp_path)
  names = ["config.1.json", "config.2.json", "config.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == names
  seeds = [json.loads((tmp_path / name).read_text())["seed"] for name in names]
  assert seeds == [0, 1, 2]


def test_only_config_lookups_count_as_the_users_key_errors():
  config = ml_collections.ConfigDict({"optimizer": {"lr": 1.0}})
  try:
    config.optimzer  # noqa: B018
  except AttributeError as e:
    assert cli_errors.is_user_error(e)
    assert cli_errors.one_line(e) == "the config has no key 'optimzer' (did you mean 'optimizer'?)"
  try:
    {}["unet"]
  except KeyError as e:
    assert not cli_errors.is_user_error(e)  # a plain dict's KeyError is a bug: its traceback shows
    assert "KeyError" in traceback.format_exc()

"""What the launchers share: TPU slice shapes, the md_jax.main command, input checks, the CLI.

Each launcher (`launch/tpu_vm.py`, `launch/xpk.py`, `launch/slurm.py`) renders its exact command
or manifest from a config and flags; `--dry_run` prints it, otherwise it runs. Flags it does not
know are an error, except `--config.<key>=<value>` overrides, which go to `md_jax.main` verbatim.
A bad input ends in status 1 and one stderr line, `FATAL <message naming the flag>`, as every
md_jax program does (`md_jax/cli_errors.py`).
"""

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


class LaunchError(ValueError):
  """A user's bad input; its message names the flag."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  cores_per_chip: int  # a v4-N or v5p-N names N TensorCores; v5litepod-N and v6e-N name N chips
  chips_per_host: int  # in a multi-host slice
  gke_accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator
  topologies: dict  # chips in the slice → chip grid (GKE label cloud.google.com/gke-tpu-topology)


# Slice shapes from Cloud TPU's system architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e: accelerator types, chips per host, topologies) and GKE's TPU node labels
# (cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus), the same table xpk encodes in
# its system_characteristics.py. Multi-host slices have 4 chips per host (VM); v5litepod-8 and
# v6e-8 are one host of 8 chips. v4/v5p grids are 3-D, v5e/v6e 2-D.
_GRID_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_GRID_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
  1024: "8x8x16",
  2048: "8x16x16",
}
GENERATIONS = {
  "v4": TpuGeneration(2, 4, "tpu-v4-podslice", _GRID_3D),
  "v5litepod": TpuGeneration(1, 4, "tpu-v5-lite-podslice", _GRID_2D),
  "v5p": TpuGeneration(2, 4, "tpu-v5p-slice", _GRID_3D),
  "v6e": TpuGeneration(1, 4, "tpu-v6e-slice", _GRID_2D),
}
ALIASES = {"v5e": "v5litepod"}  # launch/aot_compile.py's name for v5e


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  accelerator_type: str  # as gcloud and xpk spell it, e.g. v5litepod-256
  chips: int
  hosts: int
  chips_per_host: int
  topology: str
  gke_accelerator: str

  def describe(self) -> str:
    return (
      f"{self.accelerator_type}: {self.hosts} host(s) × {self.chips_per_host} chips, "
      f"topology {self.topology}"
    )


def tpu_slice(accelerator_type: str, flag: str = "--accelerator_type") -> TpuSlice:
  """The slice an accelerator type names (`v5litepod-256` → 64 hosts of 4 chips, 16x16)."""
  found = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type or "")
  generation = found and ALIASES.get(found.group(1), found.group(1))
  if not found or generation not in GENERATIONS:
    known = ", ".join(f"{g}-N" for g in GENERATIONS)
    raise LaunchError(f"{flag}={accelerator_type!r}: unknown TPU type (known: {known})")
  gen = GENERATIONS[generation]
  n = int(found.group(2))
  chips, remainder = divmod(n, gen.cores_per_chip)
  if remainder or chips not in gen.topologies:
    sizes = ", ".join(str(c * gen.cores_per_chip) for c in gen.topologies)
    raise LaunchError(f"{flag}={accelerator_type!r}: no such {generation} slice (sizes: {sizes})")
  per_host = chips if chips <= 8 and gen.cores_per_chip == 1 else min(chips, gen.chips_per_host)
  return TpuSlice(
    accelerator_type=f"{generation}-{n}",
    chips=chips,
    hosts=chips // per_host,
    chips_per_host=per_host,
    topology=gen.topologies[chips],
    gke_accelerator=gen.gke_accelerator,
  )


def check_positive(value: int, flag: str) -> int:
  if value < 1:
    raise LaunchError(f"{flag}={value}: must be ≥ 1")
  return value


def check_config(config: str) -> str:
  """`path.py[:variant]` names a config file of this checkout (the workers run the same one)."""
  if not config:
    raise LaunchError("--config is required (a config file, `configs/NAME.py[:variant]`)")
  path = pathlib.Path(config.split(":", 1)[0])
  if not (path.is_file() or (not path.is_absolute() and (REPO / path).is_file())):
    raise LaunchError(f"--config={config!r}: no such config file")
  return config


def check_gcs_workdir(workdir: str | None, shared: bool) -> str:
  """A pod's hosts share no disk: the workdir is a bucket, or (`--shared_workdir`) an absolute
  path every host mounts (Filestore, gcsfuse)."""
  if not workdir:
    raise LaunchError("--workdir is required (gs://BUCKET/PATH: every host writes there)")
  if workdir.startswith("gs://"):
    return workdir
  if shared and workdir.startswith("/"):
    return workdir
  raise LaunchError(
    f"--workdir={workdir!r}: must be gs://BUCKET/PATH, since a pod's hosts share no disk "
    "(or an absolute path every host mounts, with --shared_workdir)"
  )


def main_command(
  python: str, config: str, workdir: str, overrides: list[str], distributed: bool = True,
  slices: int = 1,
) -> list[str]:  # fmt: skip
  """The argv every process runs: `python -m md_jax.main --config=... --workdir=... ...`. Over
  several slices the data axis spans them (`config.mesh.dcn_data`), unless an override says."""
  argv = [*shlex.split(python), "-m", "md_jax.main", f"--config={config}", f"--workdir={workdir}"]
  if distributed:
    argv.append("--distributed")
  if slices > 1 and not any(o.startswith("--config.mesh.dcn_data=") for o in overrides):
    argv.append(f"--config.mesh.dcn_data={slices}")
  return argv + list(overrides)


def in_repo(repo_dir: str, argv: list[str]) -> str:
  """`cd REPO && <argv>` for a shell; a leading `~/` stays unquoted so the shell expands it."""
  if repo_dir.startswith("~/"):
    where = "~/" + shlex.quote(repo_dir[2:])
  else:
    where = shlex.quote(repo_dir)
  return f"cd {where} && {shlex.join(argv)}"


@dataclasses.dataclass
class Rendered:
  text: str  # what --dry_run prints
  argv: list[str]  # what runs without --dry_run
  stdin: str | None = None  # fed to argv (a manifest, a batch script)


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise LaunchError(message)


def parser(description: str) -> argparse.ArgumentParser:
  p = _Parser(description=description, allow_abbrev=False)
  p.add_argument("--config", required=True, help="Config file, `configs/NAME.py[:variant]`.")
  p.add_argument("--workdir", help="The run's directory (checkpoints, logs).")
  p.add_argument("--python", default="python", help="Python on the hosts (e.g. a venv's).")
  p.add_argument("--dry_run", action="store_true", help="Print what would run; run nothing.")
  return p


def add_tpu_flags(p: argparse.ArgumentParser, slices_help: str) -> None:
  """The slice flags both TPU launchers take."""
  p.add_argument(
    "--accelerator_type", required=True, help="TPU type, e.g. v5litepod-256, v4-32, v6e-64."
  )
  p.add_argument("--slices", type=int, default=1, help=slices_help)
  p.add_argument(
    "--shared_workdir",
    action="store_true",
    help="Allow an absolute --workdir that every host mounts instead of gs://.",
  )


def parse(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(flags, `--config.<key>=<value>` overrides in their order); any other flag is an error."""
  args, rest = p.parse_known_args(argv)
  for arg in rest:
    if not arg.startswith("--config."):
      raise LaunchError(f"{arg}: unknown flag (only --config.<key>=<value> pass through)")
    if "=" not in arg:
      raise LaunchError(f"{arg}: write --config.<key>=<value> as one argument")
  check_config(args.config)
  return args, rest


def run(render, argv: list[str] | None = None) -> int:
  """A launcher's CLI: render; print it (`--dry_run`) or run it; a user error is one FATAL line."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    rendered, dry_run = render(argv)
  except LaunchError as e:
    print(f"FATAL {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  if dry_run:
    print(rendered.text)
    return 0
  return subprocess.run(rendered.argv, input=rendered.stdin, text=True, check=False).returncode

"""Run md_jax.main on a SLURM GPU cluster: an sbatch script, one process per GPU.

    python launch/slurm.py --config=configs/mobilediffusion.py --workdir=/shared/runs/md \
        --nodes=4 --gpus_per_node=8 --partition=a3 --time=24:00:00 \
        --setup='source .venv/bin/activate' \
        --config.model.attention_implementation=cudnn --dry_run

The script asks for `--nodes` nodes with `--gpus_per_node` GPUs and as many tasks each, `cd`s to
the checkout (`--repo_dir`, on the shared filesystem; default this one), runs the `--setup`
lines, and `srun`s `python -m md_jax.main ... --distributed`: jax.distributed reads the
coordinator, process count and rank from SLURM's variables and gives each task the GPU of its
local rank. The workdir must be one directory every node sees (an absolute path on the shared
filesystem). SLURM signals the tasks 5 minutes before `--time` runs out; md_jax.main saves a
checkpoint and exits 75, and the script requeues the job, which resumes there. `--dry_run`
prints the script; without it, the script goes to `sbatch` on stdin.
"""

import pathlib
import re
import shlex
import sys

if __package__ in (None, ""):  # run as `python launch/slurm.py`, like launch/aot_compile.py
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common

EXIT_TO_RESUME = 75  # md_jax.stages.EXIT_TO_RESUME: saved and stopped early, rerun to resume
SIGNAL_BEFORE_END_S = 300


def build_parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--nodes", type=int, required=True, help="Nodes.")
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs (and processes) per node.")
  p.add_argument("--partition", help="SLURM partition (default: the cluster's).")
  p.add_argument("--time", help="Time limit, [D-]HH:MM:SS or minutes (default: the partition's).")
  p.add_argument("--account", help="SLURM account to charge.")
  p.add_argument("--job_name", default="md_jax", help="SLURM job name.")
  p.add_argument("--repo_dir", default=str(common.REPO), help="The checkout, on shared storage.")
  p.add_argument(
    "--setup",
    action="append",
    default=[],
    help="A shell line run before srun (repeatable), e.g. 'source .venv/bin/activate'.",
  )
  return p


def check_time(value: str | None) -> str | None:
  formats = r"\d+|\d+:\d{2}(:\d{2})?|\d+-\d+(:\d{2}){0,2}"
  if value is not None and not re.fullmatch(formats, value):
    raise common.LaunchError(
      f"--time={value!r}: not a SLURM time (MINUTES, HH:MM:SS or D-HH:MM:SS)"
    )
  return value


def check_workdir(workdir: str | None) -> str:
  if not workdir:
    raise common.LaunchError("--workdir is required (a directory every node sees)")
  if not (workdir.startswith("/") or workdir.startswith("gs://")):
    raise common.LaunchError(
      f"--workdir={workdir!r}: must be an absolute path on the shared filesystem, which every "
      "node sees (or gs://BUCKET/PATH)"
    )
  return workdir


def script(args, overrides: list[str]) -> str:
  tasks = args.nodes * args.gpus_per_node
  sbatch = [
    f"--job-name={args.job_name}",
    f"--nodes={args.nodes}",
    f"--ntasks-per-node={args.gpus_per_node}",
    f"--gpus-per-node={args.gpus_per_node}",
    "--exclusive",
    "--requeue",
    "--output=%x-%j.out",
  ]
  if args.partition:
    sbatch.append(f"--partition={args.partition}")
  if args.account:
    sbatch.append(f"--account={args.account}")
  if args.time:
    sbatch += [f"--time={args.time}", f"--signal=TERM@{SIGNAL_BEFORE_END_S}"]
  command = common.main_command(args.python, args.config, args.workdir, overrides)
  lines = [
    "#!/bin/bash",
    *(f"#SBATCH {line}" for line in sbatch),
    f"# {args.nodes} node(s) × {args.gpus_per_node} GPUs: {tasks} processes, one per GPU.",
    "set -uo pipefail",
    f"cd {shlex.quote(args.repo_dir)}",
    *args.setup,
    "status=0",
    "srun --kill-on-bad-exit=1 " + shlex.join(command) + " || status=$?",
    f'if [ "$status" -eq {EXIT_TO_RESUME} ]; then  # saved and stopped early: run again',
    '  scontrol requeue "$SLURM_JOB_ID"',
    "fi",
    'exit "$status"',
  ]
  return "\n".join(lines)


def render(argv):
  args, overrides = common.parse(build_parser(), argv)
  common.check_positive(args.nodes, "--nodes")
  common.check_positive(args.gpus_per_node, "--gpus_per_node")
  check_time(args.time)
  args.workdir = check_workdir(args.workdir)
  text = script(args, overrides)
  return common.Rendered(text=text, argv=["sbatch"], stdin=text + "\n"), args.dry_run


def main(argv=None) -> int:
  return common.run(render, argv)


if __name__ == "__main__":
  sys.exit(main())

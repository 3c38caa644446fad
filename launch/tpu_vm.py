"""Run md_jax.main on every worker of a TPU VM pod slice (or of a multi-slice queued resource).

    python launch/tpu_vm.py --config=configs/mobilediffusion.py --workdir=gs://BUCKET/md \
        --tpu=my-v5e-256 --zone=us-west4-a --project=my-project --accelerator_type=v5litepod-256 \
        --config.data.dataset=my_dataset --dry_run

Every worker runs the same command, `cd REPO && python -m md_jax.main ... --distributed`, over
`gcloud compute tpus tpu-vm ssh NAME --worker=all`; jax.distributed reads each worker's rank and
the coordinator from the TPU's metadata. The checkout (`--repo_dir`) and its Python environment
must already be on every worker (e.g. `--worker=all --command='git clone ... && pip install -e .'`).

With `--slices=N` the TPU is a queued resource of N slices (`gcloud compute tpus queued-resources
create NAME --node-count=N ...`), whose metadata carries the MEGASCALE_* variables that join the
slices; the command then goes to every worker of every slice, `queued-resources ssh --node=all`.
`--dry_run` prints the command; without it, it runs.
"""

import pathlib
import shlex
import sys

if __package__ in (None, ""):  # run as `python launch/tpu_vm.py`, like launch/aot_compile.py
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common


def build_parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--tpu", required=True, help="TPU VM (or, with --slices>1, queued resource).")
  p.add_argument("--zone", required=True, help="The TPU's zone.")
  p.add_argument("--project", help="GCP project (default: gcloud's).")
  common.add_tpu_flags(p, "Slices of the queued resource.")
  p.add_argument("--repo_dir", default="~/md_jax", help="The checkout on every worker.")
  return p


def render(argv):
  args, overrides = common.parse(build_parser(), argv)
  tpu = common.tpu_slice(args.accelerator_type)
  slices = common.check_positive(args.slices, "--slices")
  workdir = common.check_gcs_workdir(args.workdir, args.shared_workdir)
  remote = common.in_repo(
    args.repo_dir,
    common.main_command(args.python, args.config, workdir, overrides, slices=slices),
  )
  if slices == 1:
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu]
  else:
    gcloud = ["gcloud", "compute", "tpus", "queued-resources", "ssh", args.tpu, "--node=all"]
  gcloud += ["--zone", args.zone]
  if args.project:
    gcloud += ["--project", args.project]
  command = shlex.join([*gcloud, "--worker=all"]) + " --command=" + shlex.quote(remote)
  gcloud += ["--worker=all", f"--command={remote}"]
  processes = slices * tpu.hosts
  text = "\n".join(
    [
      f"# {slices} × {tpu.describe()}: {processes} processes, {slices * tpu.chips} chips",
      command,
    ]
  )
  return common.Rendered(text=text, argv=gcloud), args.dry_run


def main(argv=None) -> int:
  return common.run(render, argv)


if __name__ == "__main__":
  sys.exit(main())

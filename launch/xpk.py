"""Run md_jax.main as a GKE JobSet over one or more TPU slices: an xpk workload, or the manifest.

    python launch/xpk.py --config=configs/mobilediffusion.py --workdir=gs://BUCKET/md \
        --cluster=my-cluster --workload=md-pretrain --docker_image=gcr.io/PROJECT/md_jax \
        --accelerator_type=v5litepod-256 --slices=2 --dry_run                # xpk workload create
    python launch/xpk.py ... --format=jobset --dry_run                       # the JobSet YAML

`--format=xpk` (default) renders `xpk workload create` (github.com/AI-Hypercomputer/xpk), as
maxdiffusion and MaxText launch; xpk builds the JobSet itself. `--format=jobset` renders the
JobSet directly, shaped as xpk's (one replicated job of `--slices` replicas: one Job per slice,
each of `hosts per slice` pods, parallelism = completions, one pod per host, the slice's
`gke-tpu-accelerator` and `gke-tpu-topology` node selectors), for `kubectl apply -f -`. Each
pod runs `python -m md_jax.main ... --distributed` in `--repo_dir` of `--docker_image` (the
image holds the checkout and its environment); jax.distributed reads the TPU worker variables
GKE sets, and, across slices, the MEGASCALE_* variables set here: the slice count, the slice's
index (the JobSet's job index) and the coordinator, pod 0 of slice 0. A run stopped by
preemption saves and exits; `--max_restarts` lets the JobSet restart it, resuming there.
`--dry_run` prints the command or manifest; without it, it runs (xpk, or kubectl apply).
"""

import pathlib
import re
import shlex
import sys

if __package__ in (None, ""):  # run as `python launch/xpk.py`, like launch/aot_compile.py
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import yaml

from launch import common


def build_parser():
  p = common.parser(__doc__.splitlines()[0])
  p.add_argument("--cluster", required=True, help="GKE cluster (xpk cluster create).")
  p.add_argument("--workload", required=True, help="Workload (JobSet) name.")
  p.add_argument("--docker_image", required=True, help="Image with the checkout and its env.")
  common.add_tpu_flags(p, "Number of slices (data parallel, DCN).")
  p.add_argument("--project", help="GCP project (default: gcloud's).")
  p.add_argument("--zone", help="The cluster's zone (default: gcloud's).")
  p.add_argument("--repo_dir", default="/app", help="The checkout inside the image.")
  p.add_argument("--max_restarts", type=int, default=3, help="JobSet restarts on failure.")
  p.add_argument("--queue", help="Kueue LocalQueue for the JobSet (xpk's: multislice-queue).")
  p.add_argument("--format", choices=("xpk", "jobset"), default="xpk", help="What to render.")
  return p


def check_workload(name: str) -> str:
  """A JobSet name becomes pod hostnames (`NAME-slice-0-0.NAME`): a short DNS label."""
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
    raise common.LaunchError(
      f"--workload={name!r}: must be lowercase letters, digits and '-', start with a letter, "
      "at most 40 characters"
    )
  return name


def _field(path: str) -> dict:
  return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def env(slices: int) -> list[dict]:
  """The container's environment: the JobSet's names, and across slices the MEGASCALE_* that
  jax.distributed and libtpu read to join them over the data-center network."""
  variables = [
    {"name": "JOBSET_NAME", **_field("metadata.annotations['jobset.sigs.k8s.io/jobset-name']")},
    {
      "name": "REPLICATED_JOB_NAME",
      **_field("metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"),
    },
  ]
  if slices > 1:
    variables += [
      {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
      {"name": "MEGASCALE_SLICE_ID", **_field("metadata.labels['jobset.sigs.k8s.io/job-index']")},
      {
        "name": "MEGASCALE_COORDINATOR_ADDRESS",
        "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)",
      },
    ]
  return variables


def jobset(args, tpu: common.TpuSlice, command: list[str]) -> dict:
  pod = {
    "restartPolicy": "Never",
    "hostNetwork": True,
    "dnsPolicy": "ClusterFirstWithHostNet",
    "nodeSelector": {
      "cloud.google.com/gke-tpu-accelerator": tpu.gke_accelerator,
      "cloud.google.com/gke-tpu-topology": tpu.topology,
    },
    "containers": [
      {
        "name": "md-jax",
        "image": args.docker_image,
        "workingDir": args.repo_dir,
        "command": command,
        "env": env(args.slices),
        "ports": [{"containerPort": 8471}, {"containerPort": 8080}],
        "securityContext": {"privileged": True},
        "resources": {"limits": {"google.com/tpu": tpu.chips_per_host}},
      }
    ],
  }
  metadata = {
    "name": args.workload,
    "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
  }
  if args.queue:
    metadata["labels"] = {"kueue.x-k8s.io/queue-name": args.queue}
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": metadata,
    "spec": {
      "failurePolicy": {"maxRestarts": args.max_restarts},
      "replicatedJobs": [
        {
          "name": "slice",
          "replicas": args.slices,
          "template": {
            "spec": {
              "parallelism": tpu.hosts,
              "completions": tpu.hosts,
              "completionMode": "Indexed",
              "backoffLimit": 0,
              "template": {"spec": pod},
            }
          },
        }
      ],
    },
  }


def render(argv):
  args, overrides = common.parse(build_parser(), argv)
  tpu = common.tpu_slice(args.accelerator_type)
  common.check_positive(args.slices, "--slices")
  check_workload(args.workload)
  if args.max_restarts < 0:
    raise common.LaunchError(f"--max_restarts={args.max_restarts}: must be ≥ 0")
  workdir = common.check_gcs_workdir(args.workdir, args.shared_workdir)
  command = common.main_command(args.python, args.config, workdir, overrides, slices=args.slices)
  header = (
    f"# {args.slices} × {tpu.describe()}: "
    f"{args.slices * tpu.hosts} pods, {args.slices * tpu.chips} chips"
  )
  if args.format == "jobset":
    manifest = yaml.safe_dump(jobset(args, tpu, command), sort_keys=False)
    text = f"{header}\n# without --dry_run: kubectl apply -f - (this manifest)\n{manifest.rstrip()}"
    rendered = common.Rendered(text=text, argv=["kubectl", "apply", "-f", "-"], stdin=text)
    return rendered, args.dry_run
  xpk = ["xpk", "workload", "create", "--cluster", args.cluster, "--workload", args.workload]
  xpk += ["--docker-image", args.docker_image, "--tpu-type", tpu.accelerator_type]
  xpk += ["--num-slices", str(args.slices), "--max-restarts", str(args.max_restarts)]
  if args.project:
    xpk += ["--project", args.project]
  if args.zone:
    xpk += ["--zone", args.zone]
  xpk += ["--command", common.in_repo(args.repo_dir, command)]
  return common.Rendered(text=f"{header}\n{shlex.join(xpk)}", argv=xpk), args.dry_run


def main(argv=None) -> int:
  return common.run(render, argv)


if __name__ == "__main__":
  sys.exit(main())

"""The launchers (launch/tpu_vm.py, xpk.py, slurm.py) render the command or manifest asked for.

Nothing is executed: every case renders (`--dry_run`), through the module's function or, once
per launcher, as `python launch/<name>.py` the way the README runs it.
"""

import pathlib
import shlex
import subprocess
import sys

import pytest
import yaml

from launch import common, slurm, tpu_vm, xpk

REPO = pathlib.Path(__file__).parents[1]
CONFIG = "configs/mobilediffusion.py"
OVERRIDES = ["--config.data.dataset=my_data", "--config.text_encoder.path=/home/me/clip vit"]


def _render(module, argv):
  rendered, dry_run = module.render([*argv, "--dry_run"])
  assert dry_run
  return rendered


def _main_argv(workdir, extra=(), slices=1):
  dcn = [f"--config.mesh.dcn_data={slices}"] if slices > 1 else []  # data parallel over slices
  return [
    "python", "-m", "md_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
    "--distributed", *dcn, *OVERRIDES, *extra,
  ]  # fmt: skip


@pytest.mark.parametrize(
  "accelerator_type, chips, hosts, per_host, topology",
  [
    ("v5litepod-256", 256, 64, 4, "16x16"),
    ("v5e-16", 16, 4, 4, "4x4"),
    ("v5litepod-8", 8, 1, 8, "2x4"),
    ("v4-32", 16, 4, 4, "2x2x4"),
    ("v4-8", 4, 1, 4, "2x2x1"),
    ("v5p-128", 64, 16, 4, "4x4x4"),
    ("v6e-64", 64, 16, 4, "8x8"),
    ("v6e-4", 4, 1, 4, "2x2"),
  ],
)
def test_topology_table(accelerator_type, chips, hosts, per_host, topology):
  tpu = common.tpu_slice(accelerator_type)
  assert (tpu.chips, tpu.hosts, tpu.chips_per_host, tpu.topology) == (
    chips, hosts, per_host, topology
  )  # fmt: skip
  assert tpu.hosts * tpu.chips_per_host == tpu.chips


TPU_VM = [
  f"--config={CONFIG}", "--workdir=gs://my-bucket/md", "--tpu=md-v5e", "--zone=us-west4-a",
  "--project=my-proj", "--accelerator_type=v5litepod-256", *OVERRIDES,
]  # fmt: skip


def test_tpu_vm_renders_gcloud_ssh_to_every_worker():
  rendered = _render(tpu_vm, TPU_VM)
  *comments, line = rendered.text.splitlines()
  assert "64 processes" in comments[0]
  remote = "cd ~/md_jax && " + shlex.join(_main_argv("gs://my-bucket/md"))
  expected = [
    "gcloud", "compute", "tpus", "tpu-vm", "ssh", "md-v5e", "--zone", "us-west4-a",
    "--project", "my-proj", "--worker=all", f"--command={remote}",
  ]  # fmt: skip
  assert shlex.split(line) == expected == rendered.argv
  # What each worker's shell runs: the override with a space is still one argument.
  assert shlex.split(remote.split(" && ", 1)[1]) == _main_argv("gs://my-bucket/md")


def test_tpu_vm_multislice_goes_to_every_node_of_the_queued_resource():
  argv = shlex.split(_render(tpu_vm, [*TPU_VM, "--slices=2"]).text.splitlines()[-1])
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "md-v5e"]
  assert "--node=all" in argv and "--worker=all" in argv


XPK = [
  f"--config={CONFIG}", "--workdir=gs://my-bucket/md", "--cluster=my-cluster",
  "--workload=md-pretrain", "--docker_image=gcr.io/my-proj/md_jax:1", "--project=my-proj",
  "--zone=us-west4-a", "--accelerator_type=v5litepod-256", "--slices=2", *OVERRIDES,
]  # fmt: skip


def test_xpk_renders_workload_create():
  argv = shlex.split(_render(xpk, XPK).text.splitlines()[-1])
  assert argv[:3] == ["xpk", "workload", "create"]
  flags = dict(zip(argv[3::2], argv[4::2]))
  assert flags == {
    "--cluster": "my-cluster",
    "--workload": "md-pretrain",
    "--docker-image": "gcr.io/my-proj/md_jax:1",
    "--tpu-type": "v5litepod-256",
    "--num-slices": "2",
    "--max-restarts": "3",
    "--project": "my-proj",
    "--zone": "us-west4-a",
    "--command": "cd /app && " + shlex.join(_main_argv("gs://my-bucket/md", slices=2)),
  }


@pytest.mark.parametrize("slices", [1, 2, 4])
def test_xpk_jobset_manifest(slices):
  argv = [a for a in XPK if not a.startswith("--slices")] + [f"--slices={slices}"]
  rendered = _render(xpk, [*argv, "--format=jobset", "--accelerator_type=v5e-16"])
  manifest = yaml.safe_load(rendered.text)
  assert rendered.argv == ["kubectl", "apply", "-f", "-"] and rendered.stdin == rendered.text
  assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "md-pretrain"
  (job,) = manifest["spec"]["replicatedJobs"]
  assert job["replicas"] == slices  # one Job per slice
  spec = job["template"]["spec"]
  assert spec["parallelism"] == spec["completions"] == 4  # v5e-16: 4 hosts of 4 chips
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": "4x4",
  }
  (container,) = pod["containers"]
  assert container["image"] == "gcr.io/my-proj/md_jax:1"
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["command"] == _main_argv("gs://my-bucket/md", slices=slices)
  env = {e["name"]: e for e in container["env"]}
  megascale = {"MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "MEGASCALE_COORDINATOR_ADDRESS"}
  if slices == 1:
    assert not megascale & env.keys()
  else:
    assert megascale <= env.keys()
    assert env["MEGASCALE_NUM_SLICES"]["value"] == str(slices)
    slice_id = env["MEGASCALE_SLICE_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert slice_id == "metadata.labels['jobset.sigs.k8s.io/job-index']"
    # Pod 0 of slice 0, by the hostname JobSet gives it; its parts are defined before it.
    names = [e["name"] for e in container["env"]]
    assert env["MEGASCALE_COORDINATOR_ADDRESS"]["value"].startswith("$(JOBSET_NAME)-")
    assert names.index("JOBSET_NAME") < names.index("MEGASCALE_COORDINATOR_ADDRESS")


SLURM = [
  f"--config={CONFIG}", "--workdir=/shared/runs/md", "--nodes=4", "--gpus_per_node=8",
  "--partition=a3", "--time=24:00:00", "--repo_dir=/shared/md_jax",
  "--setup=source .venv/bin/activate", *OVERRIDES,
]  # fmt: skip


def test_slurm_renders_sbatch_script():
  rendered = _render(slurm, SLURM)
  lines = rendered.text.splitlines()
  assert rendered.argv == ["sbatch"] and rendered.stdin.rstrip() == rendered.text
  sbatch = {line.split()[1] for line in lines if line.startswith("#SBATCH ")}
  assert {
    "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=a3",
    "--time=24:00:00", "--requeue",
  } <= sbatch  # fmt: skip
  assert lines[0] == "#!/bin/bash"
  assert "cd /shared/md_jax" in lines and "source .venv/bin/activate" in lines
  (srun,) = [line for line in lines if line.startswith("srun ")]
  argv = shlex.split(srun.removesuffix(" || status=$?"))
  assert argv == ["srun", "--kill-on-bad-exit=1", *_main_argv("/shared/runs/md")]
  assert lines.index("source .venv/bin/activate") < lines.index(srun)
  subprocess.run(["bash", "-n"], input=rendered.text, text=True, check=True)  # valid shell


@pytest.mark.parametrize(
  "module, argv, flag",
  [
    (tpu_vm, [*TPU_VM, "--accelerator_type=v7x-64"], "--accelerator_type='v7x-64'"),
    (tpu_vm, [*TPU_VM, "--accelerator_type=v5litepod-12"], "--accelerator_type='v5litepod-12'"),
    (tpu_vm, [*TPU_VM, "--slices=0"], "--slices=0"),
    (tpu_vm, [*TPU_VM, "--workdir=/tmp/md"], "--workdir='/tmp/md'"),
    (tpu_vm, [a for a in TPU_VM if not a.startswith("--workdir")], "--workdir is required"),
    (tpu_vm, [*TPU_VM, "--config=configs/nope.py"], "--config='configs/nope.py'"),
    (tpu_vm, [*TPU_VM, "--worker=3"], "--worker=3: unknown flag"),
    (xpk, [*XPK, "--slices=0"], "--slices=0"),
    (xpk, [*XPK, "--accelerator_type=h100-8"], "--accelerator_type='h100-8'"),
    (xpk, [*XPK, "--workload=MD_run"], "--workload='MD_run'"),
    (xpk, [*XPK, "--workdir=relative/dir"], "--workdir='relative/dir'"),
    (slurm, [*SLURM, "--nodes=0"], "--nodes=0"),
    (slurm, [*SLURM, "--gpus_per_node=0"], "--gpus_per_node=0"),
    (slurm, [*SLURM, "--time=1h"], "--time='1h'"),
    (slurm, [*SLURM, "--workdir=runs/md"], "--workdir='runs/md'"),
  ],
)
def test_bad_input_is_one_error_naming_the_flag(module, argv, flag):
  with pytest.raises(common.LaunchError) as error:
    module.render([*argv, "--dry_run"])
  assert flag in str(error.value)


def test_shared_workdir_allows_a_mounted_path_on_a_pod():
  rendered = _render(tpu_vm, [*TPU_VM, "--workdir=/mnt/filestore/md", "--shared_workdir"])
  assert "--workdir=/mnt/filestore/md" in rendered.text


@pytest.mark.parametrize(
  "script, argv",
  [
    ("tpu_vm", TPU_VM),
    ("xpk", [*XPK, "--format=jobset"]),
    ("slurm", SLURM),
  ],
)
def test_dry_run_as_a_script(script, argv):
  """`python launch/<name>.py ... --dry_run` prints what the function renders and runs nothing."""
  module = {"tpu_vm": tpu_vm, "xpk": xpk, "slurm": slurm}[script]
  result = subprocess.run(
    [sys.executable, f"launch/{script}.py", *argv, "--dry_run"],
    cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert result.stdout.rstrip("\n") == _render(module, argv).text


def test_bad_input_as_a_script_is_one_fatal_line():
  result = subprocess.run(
    [sys.executable, "launch/xpk.py", *XPK, "--slices=0", "--dry_run"],
    cwd=REPO, capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.strip().splitlines() == ["FATAL --slices=0: must be ≥ 1"]

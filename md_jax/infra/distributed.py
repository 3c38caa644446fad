"""Joining a multi-process job: `jax.distributed` with the collectives each platform uses."""

import os

import jax


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed.initialize`: on TPU pods and SLURM every argument is auto-detected (None);
  elsewhere (e.g. localhost CPU processes) the flags give them. CPU processes exchange
  collectives over gloo (TCP); TPUs and GPUs use their own links."""
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
  )

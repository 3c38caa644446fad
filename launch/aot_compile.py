"""Ahead-of-time compile a stage's train step for a TPU slice, on any machine (libtpu needed).

    pip install -e ".[tpu]"
    python launch/aot_compile.py --config=configs/mobilediffusion.py --topology=v5e:16x16
    python launch/aot_compile.py --config=configs/mobilediffusion.py --topology=v5e:16x16 \
        --num_slices=2                       # 2 × v5e-256 over DCN (config.mesh.dcn_data)
    python launch/aot_compile.py --config=configs/diffusion.py:tiny --topology=v5e:2x2 --json
    python launch/aot_compile.py --config=configs/mobilediffusion.py --topology=v5e:16x16 \
        --cached_latents                     # the step on `md_jax.cache_latents` batches

A config that trains on a VAE run's latents compiles without one: the step is the same with the
VAE architecture's (`config.latents.vae_model`) random weights. `--cached_latents` (or
`--config.latents.cached=...`) compiles the step that reads precomputed latents and text states
instead (abstract inputs of their shapes: no cache is read): no VAE encoder in it, and CLIP only on
the empty prompt where the UNet has no learned null text. For each progressive phase it compiles
the real sharded step (global batch and resolution of the phase) against the topology's devices
and prints per-chip memory — arguments, outputs, temporaries, total — against the chip's HBM, and
the compiled FLOPs with a step-time estimate at peak. Exits 1 when a phase does not fit: check a
pod configuration before paying for the pod.
"""

import json
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:16x16", "TPU type and chip grid, e.g. v5e:16x16.")
_JSON = flags.DEFINE_bool("json", False, "Print only one JSON object.")
_SLICES = flags.DEFINE_integer(
  "num_slices", 1, "Slices of the topology (multi-slice over DCN; sets config.mesh.dcn_data)."
)
_CACHED = flags.DEFINE_bool(
  "cached_latents", False, "Compile the step on cached latents and text states (no encoders)."
)
flags.mark_flags_as_required(["config"])

GIB = 1024**3
# Per-chip HBM (GiB) and dense bf16 peak (TFLOP/s), from Cloud TPU's published specifications.
CHIPS = {
  "v4": (32, 275),
  "v5e": (16, 197),
  "v5litepod": (16, 197),
  "v5p": (95, 459),
  "v6e": (32, 918),
}


def compile_phase(config, stage, devices, phase):
  """Lowers and compiles one phase's train step on the topology's devices."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.infra import sharding

  mesh = sharding.create_mesh(config.mesh, devices=devices)
  rules = sharding.logical_axis_rules(config.logical_axis_rules)
  with nn.logical_axis_rules(rules):
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract_state, shardings, _ = sharding.create_sharded_state(stage.init_state, rng, mesh, rules)
    b, r, length = phase.global_batch_size, phase.resolution, tokenizer_lib.CONTEXT_LENGTH
    batch = {"tokens": jax.ShapeDtypeStruct((b, length), jnp.int32)}
    if stage.cached:  # what the input pipeline yields from a cache: float32 on the device
      batch["latents"] = jax.ShapeDtypeStruct((b, *stage.pipeline.latent_shape(r)), jnp.float32)
      batch["text_states"] = jax.ShapeDtypeStruct((b, length, stage.unet.text_dim), jnp.float32)
    else:
      batch["image"] = jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32)
    batch = {
      k: jax.ShapeDtypeStruct(
        v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, rules, v.ndim)
      )
      for k, v in batch.items()
    }
    # The trainer's jit, applied to abstract inputs placed on the topology's chips.
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    step = sharding.jit_train_step(stage.train_step, shardings, batch_shardings)
    with jax.set_mesh(mesh):
      compiled = step.lower(abstract_state, batch).compile()
  return compiled


def _hbm_overflow(error) -> tuple[float, float] | None:
  """(used, available) GiB from XLA:TPU's compile-time out-of-HBM error, None for other errors:
  a phase that does not fit is a figure to report, not a traceback."""
  for pattern in (  # the two forms libtpu 0.0.42 words it in
    r"Used ([\d.]+)G of ([\d.]+)G hbm",
    r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
  ):
    found = re.search(pattern, str(error))
    if found:
      return float(found.group(1)), float(found.group(2))
  return None


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # libtpu looks for a TPU VM's metadata; compiling for a described topology needs none.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
  import jax
  from jax.experimental import topologies

  from md_jax.infra.phases import phases_from_config
  from md_jax.training import diffusion

  config = _CONFIG.value
  chip = _TOPOLOGY.value.split(":")[0]
  if chip not in CHIPS:
    raise app.UsageError(f"--topology={_TOPOLOGY.value}: unknown chip {chip!r} ({sorted(CHIPS)})")
  hbm_gib, peak_tflops = CHIPS[chip]
  topology = topologies.get_topology_desc(
    platform="tpu", topology_name=_TOPOLOGY.value, num_slices=_SLICES.value
  )
  if _SLICES.value > 1 and config.mesh.get("dcn_data", 1) == 1:
    config.mesh.dcn_data = _SLICES.value  # data parallel across the slices, FSDP within each
  devices = topology.devices
  if config.latents.kind == "vae" and not config.latents.checkpoint:
    # Memory and FLOPs need the VAE's architecture, not its weights: the encoder is in the step.
    config.latents.kind = "untrained_vae"
    if not _JSON.value:
      print("config.latents.checkpoint is empty: compiling latents.vae_model at random weights")
  if _CACHED.value and not config.latents.get("cached"):
    config.latents.cached = "(abstract: --cached_latents)"  # the step's inputs, not read
  stage = diffusion.DiffusionStage(config)
  results = []
  for phase in phases_from_config(config):
    try:
      compiled = compile_phase(config, stage, devices, phase)
    except jax.errors.JaxRuntimeError as e:
      over = _hbm_overflow(e)
      if over is None:
        raise
      results.append({
          "resolution": phase.resolution,
          "global_batch_size": phase.global_batch_size,
          "chips": len(devices),
          "total_gib": over[0],
          "hbm_gib": hbm_gib,
          "fits": False,
          "compiler": f"out of HBM: used {over[0]} of {over[1]} GiB",
      })  # fmt: skip
      if not _JSON.value:
        print(
          f"{_TOPOLOGY.value} {len(devices)} chips, {phase.resolution} px, batch "
          f"{phase.global_batch_size}: DOES NOT FIT: the compiler ran out of HBM, using at least "
          f"{over[0]} of {over[1]} GiB per chip"
        )
      continue
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
      + memory.generated_code_size_in_bytes
    )
    flops = float(cost.get("flops", 0.0))  # per chip: the SPMD program each chip runs
    results.append({
        "resolution": phase.resolution,
        "global_batch_size": phase.global_batch_size,
        "chips": len(devices),
        "argument_gib": round(memory.argument_size_in_bytes / GIB, 3),
        "output_gib": round(memory.output_size_in_bytes / GIB, 3),
        "alias_gib": round(memory.alias_size_in_bytes / GIB, 3),
        "temp_gib": round(memory.temp_size_in_bytes / GIB, 3),
        "total_gib": round(total / GIB, 3),
        "hbm_gib": hbm_gib,
        "fits": total <= hbm_gib * GIB,
        "tflops_per_chip": round(flops / 1e12, 3),
        "flops_per_chip": flops,
        "step_seconds_at_peak": round(flops / (peak_tflops * 1e12), 6),
    })  # fmt: skip
    if not _JSON.value:
      r = results[-1]
      print(
        f"{_TOPOLOGY.value} {r['chips']} chips, {r['resolution']} px, batch "
        f"{r['global_batch_size']}: per chip args {r['argument_gib']} + out {r['output_gib']} "
        f"- donated {r['alias_gib']} + temp {r['temp_gib']} = {r['total_gib']} GiB of "
        f"{hbm_gib} GiB ({'fits' if r['fits'] else 'DOES NOT FIT'}); "
        f"{r['tflops_per_chip']} TFLOP/chip/step, >= {r['step_seconds_at_peak']} s/step at peak"
      )
  print(json.dumps({
      "topology": _TOPOLOGY.value, "num_slices": _SLICES.value,
      "cached_latents": stage.cached, "phases": results,
  }))  # fmt: skip
  if not all(r["fits"] for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

r"""Train-step efficiency: the step's FLOP/s over this machine's matmul FLOP/s, in one process.

    python -m md_jax.benchmarks.train_step                    # tiny and mid-size, on this CPU
    python -m md_jax.benchmarks.train_step --sizes=full --batch=2   # the full-size step, on a CPU
    python -m md_jax.benchmarks.train_step --sizes=quarter,half,full --batch=2   # by width, 256 px
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
    python -m md_jax.benchmarks.train_step --sizes=full --dtype=bfloat16 --batch=512 \
        --attention=cudnn --matmul_size=8192                  # on an H100: MFU at 256 px
    python -m md_jax.benchmarks.train_step --sizes=main --cpu_devices=2 \
        --job=workdirs/main                                  # the main job's step, on 2 devices

FLOPs per step are the model's matmul and convolution FLOPs counted from the step's jaxpr
(`model_flops`: the same count on every backend; XLA's GPU cost analysis misses cuDNN
convolutions; a frozen part's backward pass is not in the step's jaxpr, as it is not in its
program), with XLA's count of the compiled step beside it; the reference is a large jitted
matmul timed in the same run, so the ratio is a machine-independent utilisation ("MFU against
what this device actually reaches"). On a GPU the step is also reported against the chip's
published dense bf16 peak. Steps are timed as the trainer runs them (the host one step ahead)
and one at a time; medians of interleaved timings. `--profile_dir` also traces a few steps and
prints where the device time goes. Last line: one JSON object.
"""

import functools
import json
import os
import statistics
import time

from absl import app, flags, logging

_SIZES = flags.DEFINE_list(
  "sizes", ["tiny", "mid"], "Configs to time: tiny, mid, main, quarter, half, full."
)
_CPU_DEVICES = flags.DEFINE_integer(
  "cpu_devices", 0, "Split this CPU host into N devices, the batch sharded over them (0: as is)."
)
_JOB = flags.DEFINE_string(
  "job",
  "",
  "main: a main job's workdir, whose runs the step reads as the job does (the light decoder's "
  "encoder for the latents, the latent classifier for representation alignment). Default: the "
  "UNet step alone (latents from a random projection, no alignment term).",
)
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch for every size (0: each size's own).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise the UNet's blocks in the backward pass.")
_DTYPE = flags.DEFINE_string(
  "dtype", "float32", "UNet and text-encoder compute dtype (params stay float32)."
)
_ATTENTION = flags.DEFINE_enum(
  "attention",
  "xla",
  ["xla", "cudnn"],
  "The UNet's softmax attention (model.attention_implementation).",
)
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed steps per config (median reported).")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "Side of the reference square matmul.")
_PROFILE = flags.DEFINE_string(
  "profile_dir",
  "",
  "Also trace --profile_steps steps of each config into DIR/NAME with jax.profiler and print "
  "where the device time goes (md_jax.benchmarks.profile_summary).",
)
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Steps traced with --profile_dir.")

# Dense bf16 peaks (TFLOP/s) of accelerators this may run on, for the MFU figure.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_flops_per_second(size: int, dtype, repeats: int) -> float:
  import jax

  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2 * size**3 / seconds


def check_attention(implementation: str, dtype) -> float:
  """Relative error of `implementation`'s attention and its q/k/v gradients against the XLA
  einsums, at the UNet's cross-attention shape (1024 queries, 77 text keys, 5 heads of 64): a fast
  path is timed only if it computes the same function."""
  import jax
  import jax.numpy as jnp

  from md_jax.models import attention

  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (8, 1024, 5, 64), dtype)
  k, v = (jax.random.normal(key, (8, 77, 5, 64), dtype) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape, dtype)

  def outputs(impl):
    out, vjp = jax.vjp(lambda *a: attention.dot_product_attention(*a, implementation=impl), q, k, v)
    return [out, *vjp(cotangent)]

  errors = []
  for fast, ref in zip(jax.jit(outputs, static_argnums=0)(implementation), outputs("xla")):
    fast, ref = fast.astype(jnp.float32), ref.astype(jnp.float32)
    errors.append(float(jnp.linalg.norm(fast - ref) / jnp.linalg.norm(ref)))
  if max(errors) > 2e-2:
    raise RuntimeError(f"{implementation} attention differs from xla's: relative errors {errors}")
  return max(errors)


def size_config(name: str, dtype: str = "float32"):
  """(diffusion stage config, batch size, resolution) of size `name` (see `--sizes`)."""
  from md_jax.config_utils import load_config

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if name in ("full", "half", "quarter"):  # MobileDiffusion at 256 px (32×32×8 latents)
    config = load_config(f"{repo}/configs/mobilediffusion.py")
    batch_size, resolution = 16, 256  # the pod recipe's per-chip batch (4096 over 256 chips)
    config.mesh.fsdp = 1  # the pod's 16-way FSDP does not fit one host's devices: data-parallel
    config.latents.kind = "projection"  # the UNet step alone, as every figure here measured it
    # The same layout and text encoder at a half or a quarter of the widths: the ratio by width.
    divisor = {"full": 1, "half": 2, "quarter": 4}[name]
    config.model.channels = tuple(c // divisor for c in config.model.channels)
    config.model.time_embed_dim //= divisor
    if divisor == 4:
      config.model.norm_groups = 16  # 80 channels: 32 groups do not divide them
  elif name == "main":  # the main job's diffusion stage as configured, in its 64 px phase
    from md_jax import main_job

    config = load_config(f"{repo}/configs/main.py").stages.diffusion
    if _JOB.value:
      config = main_job.resolve_workdir(config, _JOB.value)
    else:  # no runs to read the encoder and the classifier from: the UNet step alone
      config.latents.kind, config.latents.checkpoint = "projection", ""
      config.representation_alignment.update(checkpoint="", weight=0.0)
    batch_size, resolution = config.progressive.batch_sizes[-1], config.progressive.resolutions[-1]
  else:
    config = load_config(f"{repo}/configs/diffusion.py:tiny")
    batch_size, resolution = 16, 32
    if name == "mid":  # the MobileDiffusion layout at reduced width, 16×16×8 latents
      config.model = load_config(f"{repo}/configs/models/mobilediffusion.py")
      config.model.channels = (64, 128, 192)
      config.model.norm_groups = 16
      config.model.text_dim = config.text_encoder.hidden_size
      batch_size, resolution = 8, 64
  batch_size = _BATCH.value or batch_size
  # `--dtype` is the whole step's: the full config's CLIP text encoder computes in bf16 otherwise,
  # against a reference matmul in `--dtype`.
  config.model.dtype = config.text_encoder.dtype = dtype
  config.model.remat = _REMAT.value
  config.model.attention_implementation = _ATTENTION.value
  config.data.resolution = resolution
  return config, batch_size, resolution


def benchmark_config(name: str, dtype: str):
  """Compiles the real diffusion train step for a config; returns (flops/step, step runner)."""
  import jax
  import jax.numpy as jnp

  from md_jax.benchmarks import model_flops
  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.infra import sharding as sharding_lib
  from md_jax.training import diffusion

  config, batch_size, resolution = size_config(name, dtype)
  config.mesh.num_devices = jax.device_count()
  stage = diffusion.DiffusionStage(config)
  mesh = sharding_lib.create_mesh(config.mesh)
  rules = sharding_lib.logical_axis_rules(config.logical_axis_rules)
  import flax.linen as nn

  started = time.perf_counter()
  with nn.logical_axis_rules(rules):
    rng = jax.random.key_data(jax.random.key(0))
    _, shardings, init = sharding_lib.create_sharded_state(stage.init_state, rng, mesh, rules)
    state = init(rng)
  batch = {
    "image": jax.random.uniform(jax.random.key(2), (batch_size, resolution, resolution, 3)) * 2 - 1,
    "tokens": jnp.asarray(
      tokenizer_lib.tokenize(stage.pipeline.tokenizer, ["a small red circle on a white background"])
    ).repeat(batch_size, 0),
  }
  batch_shardings = {k: sharding_lib.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
  batch = jax.device_put(batch, batch_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = sharding_lib.jit_train_step(stage.train_step, shardings, batch_shardings)
    compiled = step.trace(state, batch).lower().compile()
    # The model's FLOPs, counted from the jaxpr (the same on every backend; XLA's GPU cost
    # analysis misses cuDNN convolutions), with attention as the einsums whatever the backend.
    flops = model_flops.model_flops(step, state, batch)
    logging.info("%s: step compiled at %.0f s", name, time.perf_counter() - started)
  memory = compiled.memory_analysis()
  if memory is not None:  # per device: what a batch size needs, before it runs out of memory
    logging.info(
      "%s: per-device memory: arguments %.2f GiB, temporaries %.2f GiB",
      name,
      memory.argument_size_in_bytes / 2**30,
      memory.temp_size_in_bytes / 2**30,
    )
  # XLA's count of the compiled program, per device times the devices, is reported beside it.
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  compiled_flops = float(cost["flops"]) * jax.device_count()
  holder = {"state": state}

  def run_synchronously():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  def run_as_trainer(steps: int = 4):
    """`steps` steps as the trainer runs them: it waits on the previous step's metrics only
    after the next step is dispatched, so the host's dispatch overlaps the device's work."""
    previous = None
    for _ in range(steps):
      holder["state"], metrics = compiled(holder["state"], batch)
      jax.block_until_ready(previous)
      previous = metrics
    jax.block_until_ready(previous)

  run_synchronously()
  logging.info("%s: first step done at %.0f s", name, time.perf_counter() - started)
  return flops, compiled_flops, (run_synchronously, run_as_trainer), batch_size, resolution


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from md_jax.infra import sharding

  sharding.split_cpu_host(_CPU_DEVICES.value)
  import jax
  import jax.numpy as jnp

  dtype = jnp.dtype(_DTYPE.value)
  if _ATTENTION.value != "xla":
    error = check_attention(_ATTENTION.value, dtype)
    print(f"{_ATTENTION.value} attention: relative error {error:.1e} against xla (out and grads)")
  runners = {name: benchmark_config(name, _DTYPE.value) for name in _SIZES.value}
  # Interleave: reference, then each config, repeatedly, so machine noise hits all alike. Each
  # config is timed as the trainer runs it (`step_ms`: 4 steps, the host one step ahead) and one
  # step at a time (`sync_step_ms`: dispatch and the wait for the result included).
  pipelined_steps = 4
  matmul_rates = []
  step_times = {name: [] for name in runners}
  sync_times = {name: [] for name in runners}
  for _ in range(3):
    matmul_rates.append(matmul_flops_per_second(_MATMUL.value, dtype, 3))
    for name, (_, _, (run_synchronously, run_as_trainer), _, _) in runners.items():
      repeats = max(1, _REPEATS.value // 3)
      sync_times[name].append(_median_seconds(run_synchronously, repeats))
      pipelined = _median_seconds(functools.partial(run_as_trainer, pipelined_steps), repeats)
      step_times[name].append(pipelined / pipelined_steps)
  reference = statistics.median(matmul_rates)
  device = jax.devices()[0]
  result = {
    "device": getattr(device, "device_kind", str(device)),
    "dtype": _DTYPE.value,
    "attention": _ATTENTION.value,
    "devices": jax.device_count(),
    "matmul_tflops": round(reference / 1e12, 4),
  }
  for name, (flops, compiled_flops, _, batch_size, resolution) in runners.items():
    seconds = statistics.median(step_times[name])
    rate = flops / seconds
    result[name] = {
      "batch": batch_size,
      "resolution": resolution,
      "gflops_per_step": round(flops / 1e9, 2),
      "xla_gflops_per_step": round(compiled_flops / 1e9, 2),
      "step_ms": round(seconds * 1e3, 2),
      "sync_step_ms": round(statistics.median(sync_times[name]) * 1e3, 2),
      "step_tflops": round(rate / 1e12, 4),
      "ratio_to_matmul": round(rate / reference, 3),
    }
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
    if peak:
      result[name]["mfu_vs_peak"] = round(rate / (peak * 1e12), 3)
    print(
      f"{name}: {seconds * 1e3:.1f} ms/step ({result[name]['sync_step_ms']:.1f} one at a time), "
      f"{rate / 1e12:.3f} TFLOP/s = {rate / reference:.2f} of the {reference / 1e12:.3f} TFLOP/s "
      "matmul"
    )
  if _PROFILE.value:
    for name, (_, _, (_, run_as_trainer), _, _) in runners.items():
      profile(run_as_trainer, os.path.join(_PROFILE.value, name), _PROFILE_STEPS.value)
  print(json.dumps(result))


def profile(run, log_dir: str, steps: int):
  """Traces `run(steps)` (steps as the trainer runs them) and prints the device time per op."""
  import jax

  from md_jax.benchmarks import profile_summary

  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    run(steps)
  profile_summary.print_summary(log_dir, steps, top=25)


if __name__ == "__main__":
  app.run(main)

r"""md_jax against its PyTorch peer, diffusers, on the same CPU: the UNet and the VAE decoder.

  python -m md_jax.benchmarks.peer_diffusers [--width=0.5] [--runs=5] [--threads=2] \
      [--cases=unet_forward_64,unet_forward_32,unet_train_32,vae_decoder] [--dtype=bfloat16]

Both sides build the same layout with random weights, fp32, and their parameter counts are printed
(and must be equal, or the run stops). `--dtype=bfloat16` runs the forwards (not the training
step) in bf16 on both sides, weights included (md_jax: `dtype` in the model config and the params
cast; diffusers: `.to(torch.bfloat16)`), and times diffusers in fp32 beside them, interleaved, for
the ratio a user who picks bf16 inference in md_jax sees against diffusers' default:

* UNet: SD-1.5's layout (`configs/models/sd15.py`) with every width × `--width` (0.5: channels
  (160, 320, 640, 640), time embedding 640, 219.79M parameters) against diffusers'
  `UNet2DConditionModel` with the same `block_out_channels` (8 heads, 2 layers per block, 768-d
  text). Cases: forward at batch 1 on a 64×64×4 and a 32×32×4 latent with 77×768 text, and forward
  + backward (gradient of the mean squared output w.r.t. every parameter) at batch 2 on 32×32×4.
* VAE decoder: `configs/models/vae.py`'s full decoder (KL-f8, 8 latent channels) against diffusers'
  `AutoencoderKL` with `latent_channels=8` (its `post_quant_conv` then `decoder`, which is what
  md_jax's `Decoder` holds, less the mid attention's q/k/v biases that md_jax's layout does not
  have), batch 1, 64×64×8 → 512×512×3.

JAX runs jitted on one CPU device (XLA's thread pool uses every core); torch on `--threads` intra-op
threads (`torch.inference_mode` for forwards). Each function is run once before timing, then the two
sides alternate (md_jax, diffusers, md_jax, …) so that drift in a shared machine's load hits both
medians alike. Measure on an idle machine: under load torch's threads slow down far more than XLA's.
The last line is one JSON object.
"""

import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from md_jax.benchmarks import timing
from md_jax.config_utils import load_config
from md_jax.models import vae
from md_jax.models.unet import UNet

_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models"
CASES = ("unet_forward_64", "unet_forward_32", "unet_train_32", "vae_decoder")

_WIDTH = flags.DEFINE_float("width", 0.5, "UNet widths × this (1.0 = SD-1.5, 859.52M params).")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per side (interleaved).")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads.")
_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {CASES} to run.")
_VAE_LATENT = flags.DEFINE_integer("vae_latent_size", 64, "VAE latent side (64 → 512 px).")
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "Both sides' forwards (the training step: fp32)."
)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def sd15_layout(width: float):
  """configs/models/sd15.py with every width scaled (a multiple of its 32 norm groups)."""
  config = load_config(str(_CONFIGS / "sd15.py"))
  channels = tuple(int(c * width) for c in config.channels)
  if any(c % config.norm_groups for c in channels):
    raise ValueError(f"--width={width}: channels {channels} not multiples of 32 (GroupNorm)")
  config.channels = channels
  config.time_embed_dim = 4 * channels[0]
  return config


def _import_diffusers():
  from md_jax.tools.torchvision_compat import make_torchvision_importable

  make_torchvision_importable()  # diffusers imports torchvision when it is installed
  import diffusers

  return diffusers


def torch_unet(config):
  diffusers = _import_diffusers()

  return diffusers.UNet2DConditionModel(
    in_channels=config.in_channels,
    out_channels=config.out_channels,
    block_out_channels=tuple(config.channels),
    layers_per_block=2,
    attention_head_dim=config.num_heads,  # diffusers' legacy name: the number of heads
    cross_attention_dim=config.text_dim,
    norm_num_groups=config.norm_groups,
  )


def torch_vae_decoder(config):
  import torch

  diffusers = _import_diffusers()

  autoencoder = diffusers.AutoencoderKL(
    in_channels=3,
    out_channels=3,
    latent_channels=config.latent_channels,
    down_block_types=("DownEncoderBlock2D",) * len(config.decoder.channel_mult),
    up_block_types=("UpDecoderBlock2D",) * len(config.decoder.channel_mult),
    block_out_channels=tuple(config.decoder.channels * m for m in config.decoder.channel_mult),
    layers_per_block=config.decoder.num_res_blocks - 1,  # diffusers' decoder adds one per level
    norm_num_groups=config.num_groups,
  )
  # md_jax's mid-block attention (models/vae.py) has no q/k/v biases; SD's has 3 × 512 more.
  for attention in autoencoder.decoder.mid_block.attentions:
    attention.to_q.bias = attention.to_k.bias = attention.to_v.bias = None
  return torch.nn.Sequential(autoencoder.post_quant_conv, autoencoder.decoder)


def _torch_dtypes(dtype: str):
  """The peer's dtypes to time: `dtype`'s, then float32 beside a bf16 run."""
  import torch

  return [torch.float32] if dtype == "float32" else [torch.bfloat16, torch.float32]


def _cast(tree, dtype: str):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def unet_case(case: str, config, threads: int, dtype: str = "float32"):
  """(md_jax thunk, [torch thunk per `_torch_dtypes`], md_jax params, torch params) of one UNet
  case; `dtype` is the forwards' (a training step is fp32)."""
  import torch

  dtype = "float32" if "train" in case else dtype
  config = config.copy_and_resolve_references()
  config.dtype = dtype

  size = 64 if case.endswith("64") else 32
  batch = 2 if "train" in case else 1
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, config.in_channels), np.float32)
  t = rng.uniform(0, 1000, (batch,)).astype(np.float32)
  text = rng.standard_normal((batch, config.text_length, config.text_dim), np.float32)

  unet = UNet.from_config(config)
  variables = jax.jit(unet.init)(jax.random.key(0), x, t, text)
  if "train" in case:
    loss = lambda v: jnp.mean(jnp.square(unet.apply(v, x, t, text)))
    step = jax.jit(jax.grad(loss))
    md = lambda: jax.block_until_ready(step(variables))
  else:
    forward = jax.jit(unet.apply)
    weights = _cast(variables, dtype)
    md = lambda: forward(weights, x, t, text).block_until_ready()

  torch.set_num_threads(threads)
  model = torch_unet(config)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tt, ttext = torch.from_numpy(t), torch.from_numpy(text)
  if "train" in case:
    model.train()

    def peer():
      model.zero_grad(set_to_none=True)
      model(tx, tt, ttext).sample.square().mean().backward()

    return md, [peer], _count(variables), sum(p.numel() for p in model.parameters())

  peers = _torch_forwards(model.eval(), dtype, lambda d: (tx.to(d), tt, ttext.to(d)))
  return md, peers, _count(variables), sum(p.numel() for p in model.parameters())


def _torch_forwards(model, dtype: str, inputs_in):
  """A forward thunk per `_torch_dtypes(dtype)`: `model` itself in float32, a cast copy otherwise
  (`.to` casts in place), on `inputs_in(torch dtype)`."""
  import copy

  import torch

  def forward_in(torch_dtype):
    module = model if torch_dtype == torch.float32 else copy.deepcopy(model).to(torch_dtype)
    inputs = inputs_in(torch_dtype)

    def peer():
      with torch.inference_mode():
        module(*inputs)

    return peer

  return [forward_in(d) for d in _torch_dtypes(dtype)]


def vae_case(latent_size: int, threads: int, dtype: str = "float32"):
  import torch

  config = load_config(str(_CONFIGS / "vae.py"))
  config.dtype = dtype
  decoder = vae.decoder_from_config(config.decoder, config)
  z = np.random.default_rng(0).standard_normal(
    (1, latent_size, latent_size, config.latent_channels), np.float32
  )
  params = jax.jit(decoder.init)(jax.random.key(0), z)
  forward = jax.jit(decoder.apply)
  weights = _cast(params, dtype)
  md = lambda: forward(weights, z).block_until_ready()

  torch.set_num_threads(threads)
  model = torch_vae_decoder(config).eval()
  tz = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())

  peers = _torch_forwards(model, dtype, lambda d: (tz.to(d),))
  return md, peers, _count(params), sum(p.numel() for p in model.parameters())


def main(argv):
  del argv
  unknown = set(_CASES.value) - set(CASES)
  if unknown:
    raise ValueError(f"--cases: unknown {sorted(unknown)} (known: {', '.join(CASES)})")
  config = sd15_layout(_WIDTH.value)
  dtype = _DTYPE.value
  result = {
    **timing.machine(),
    "width": _WIDTH.value,
    "torch_threads": _THREADS.value,
    "dtype": dtype,
  }
  for case in _CASES.value:
    if case == "vae_decoder":
      md, peers, md_params, peer_params = vae_case(_VAE_LATENT.value, _THREADS.value, dtype)
    else:
      md, peers, md_params, peer_params = unet_case(case, config, _THREADS.value, dtype)
    if md_params != peer_params:
      raise ValueError(f"{case}: md_jax has {md_params} params, diffusers {peer_params}")
    for fn in (md, *peers):  # compile, allocate
      fn()
    md_times, peer_times, *fp32_times = timing.interleaved_times(_RUNS.value, md, *peers)
    md_median, peer_median = statistics.median(md_times), statistics.median(peer_times)
    result[case] = row = {
      "params": md_params,
      "dtype": "float32" if "train" in case else dtype,
      "md_jax_s": md_median,
      "diffusers_s": peer_median,
      "ratio": md_median / peer_median,
      "md_jax_times_s": md_times,
      "diffusers_times_s": peer_times,
    }
    line = (
      f"{case:16s} {md_params / 1e6:8.2f}M params {row['dtype']:8s}  md_jax {md_median:7.3f} s  "
      f"diffusers {peer_median:7.3f} s  ratio {md_median / peer_median:.2f}"
    )
    if fp32_times:
      fp32_median = statistics.median(fp32_times[0])
      row |= {"diffusers_float32_s": fp32_median, "ratio_to_float32": md_median / fp32_median}
      row["diffusers_float32_times_s"] = fp32_times[0]
      line += f"  (diffusers fp32 {fp32_median:7.3f} s: ratio {md_median / fp32_median:.2f})"
    print(line, flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)

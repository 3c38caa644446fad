r"""Prints a UNet config's row of the paper's Table 1, and the parameter cost of each MD ablation.

  python -m md_jax.tools.model_stats --config=configs/models/mobilediffusion.py [--latent_size=64]
  python -m md_jax.tools.model_stats --config=configs/models/sd15.py --json

Parameters come from `jax.eval_shape(init)` (nothing is allocated, so the 860M-parameter SD-1.5
UNet costs ~2 s). FLOPs come from XLA's cost analysis of the jitted forward at batch 1: the lowered
(unoptimised) module by default, `--compiled` for the optimised one (they agree within 0.01% on
SD-1.5, compiling takes ~6× longer).

FLOP convention: the paper's "GFLOPs" are multiply-adds. XLA counts a multiply-add as 2 flops, so
GFLOPs here = XLA flops / 2 / 1e9. Check: SD-1.5 at a 64×64 latent gives 394.4 (paper 392, +0.6%);
XLA's raw count would be 788.7.

The ablations flip one MobileDiffusion switch back to the SD choice on the given config and report
how many parameters the switch saves, relative to the model without it, next to the paper's claim
(Sec. 3.2-3.3): shared K/V ~5%, FFN expansion 4 -> 3 ~10%, separable conv blocks ~10%.
"""

import json
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from md_jax.config_utils import load_config
from md_jax.models import cpu_lowering
from md_jax.models.unet import UNet

_CONFIG = flags.DEFINE_string("config", None, "UNet model config file (`file.py[:arg]`).")
_LATENT_SIZE = flags.DEFINE_integer("latent_size", 64, "Latent height = width for the FLOP count.")
_JSON = flags.DEFINE_bool("json", False, "Print only one JSON object.")
_COMPILED = flags.DEFINE_bool("compiled", False, "FLOPs of the compiled (optimised) HLO.")
_ABLATIONS = flags.DEFINE_bool("ablations", True, "Report the parameter deltas of the ablations.")

# Paper's parameter reduction for each switch (Sec. 3.2 / 3.3), as a fraction.
PAPER_ABLATIONS = {"shared_kv": 0.05, "ffn_expansion_3": 0.10, "separable_conv": 0.10}


def layout_counts(config) -> dict:
  """Table-1 counts from a UNet config (ConfigDict, dict or UNet): conv blocks, SA and CA layers.

  Conv blocks are the residual blocks (resample convs excluded, as the paper's 22 for SD-1.5).
  """
  get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
  down, up = get("down_transformer_depths"), get("up_transformer_depths")
  down_sa, up_sa = get("down_self_attention"), get("up_self_attention")
  stacks = [
    (depth, sa)
    for depths, sas in ((down, down_sa), (up, up_sa))
    for level_depths, level_sa in zip(depths, sas)
    for depth, sa in zip(level_depths, level_sa)
  ]
  stacks.append((get("mid_transformer_depth"), get("mid_self_attention")))
  return {
    "channels": tuple(get("channels")),
    "num_conv_blocks": sum(len(d) for d in down) + sum(len(u) for u in up) + 2,
    "num_sa": sum(depth for depth, sa in stacks if sa),
    "num_ca": sum(depth for depth, _ in stacks),
  }


def _example_inputs(unet: UNet, latent_size: int, batch: int = 1):
  x = jax.ShapeDtypeStruct((batch, latent_size, latent_size, unet.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  text = jax.ShapeDtypeStruct((batch, unet.text_length, unet.text_dim), jnp.float32)
  return x, t, text


def abstract_params(unet: UNet, latent_size: int = 8):
  """Boxed (logically partitioned) parameter shapes; no memory is allocated."""
  inputs = _example_inputs(unet, latent_size)
  return jax.eval_shape(lambda *a: unet.init(jax.random.key(0), *a), *inputs)["params"]


def param_count(unet: UNet) -> int:
  # Parameter shapes do not depend on the input resolution, so the smallest valid latent is used.
  latent = 2 ** (len(unet.channels) - 1)
  return sum(int(x.size) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(unet, latent))))


def forward_gflops(unet: UNet, latent_size: int = 64, compiled: bool = False) -> float:
  """Multiply-adds (XLA flops / 2) of one forward pass at batch 1, in units of 1e9."""
  params = nn.meta.unbox(abstract_params(unet, latent_size))
  with cpu_lowering.portable():  # the model's count, not the CPU lowering's loops
    lowered = jax.jit(lambda p, *a: unet.apply({"params": p}, *a)).lower(
      params, *_example_inputs(unet, latent_size)
    )
  cost = lowered.compile().cost_analysis() if compiled else lowered.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost["flops"]) / 2e9


def ablation_variants(unet: UNet) -> dict[str, UNet]:
  """The config without each MD switch that it uses (key -> the model lacking that switch)."""
  variants = {}
  if unet.shared_kv:
    variants["shared_kv"] = unet.clone(shared_kv=False)
  if unet.ffn_expansion == 3:
    variants["ffn_expansion_3"] = unet.clone(ffn_expansion=4)
  if "separable" in unet.block_types:
    variants["separable_conv"] = unet.clone(block_types=("resnet",) * len(unet.block_types))
  return variants


def model_stats(
  config, latent_size: int = 64, *, compiled: bool = False, ablations: bool = True
) -> dict:
  unet = UNet.from_config(config)
  stats = dict(layout_counts(config))
  stats["channels"] = list(stats["channels"])
  stats["params"] = param_count(unet)
  stats["latent_size"] = latent_size
  stats["gflops"] = forward_gflops(unet, latent_size, compiled)
  stats["flops_convention"] = "multiply-adds = XLA flops / 2, batch 1"
  if ablations:
    stats["ablations"] = {}
    for key, variant in ablation_variants(unet).items():
      without = param_count(variant)
      stats["ablations"][key] = {
        "params_without": without,
        "saved": without - stats["params"],
        "saved_fraction": (without - stats["params"]) / without,
        "paper_fraction": PAPER_ABLATIONS[key],
      }
  return stats


_ABLATION_NAMES = {
  "shared_kv": "shared K/V in self-attention",
  "ffn_expansion_3": "FFN expansion 4 -> 3",
  "separable_conv": "separable conv blocks (vs ResNet)",
}


def format_row(name: str, stats: dict) -> str:
  lines = [
    f"{'model':<22}{'channels':<26}{'conv blocks':>12}{'SA+CA':>9}{'params(M)':>11}{'GFLOPs':>9}",
    f"{name:<22}{tuple(stats['channels'])!s:<26}{stats['num_conv_blocks']:>12}"
    f"{str(stats['num_sa']) + '+' + str(stats['num_ca']):>9}{stats['params'] / 1e6:>11.2f}"
    f"{stats['gflops']:>9.4g}",
    f"(GFLOPs at a {stats['latent_size']}x{stats['latent_size']} latent, "
    f"{stats['flops_convention']})",
  ]
  if stats.get("ablations"):
    lines.append("ablations: parameters saved by each switch (relative to the model without it)")
    for key, a in stats["ablations"].items():
      saved_m, saved_pct = -a["saved"] / 1e6, -100 * a["saved_fraction"]
      lines.append(
        f"  {_ABLATION_NAMES[key]:<36}{saved_m:>9.4g}M {saved_pct:>6.1f}%"
        f"   paper: ~-{100 * a['paper_fraction']:.0f}%"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  config = load_config(_CONFIG.value)
  stats = model_stats(
    config, _LATENT_SIZE.value, compiled=_COMPILED.value, ablations=_ABLATIONS.value
  )
  if not _JSON.value:
    print(format_row(_CONFIG.value.split("/")[-1], stats))
  print(json.dumps(stats, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)

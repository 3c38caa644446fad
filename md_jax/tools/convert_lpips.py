"""One-time conversion of the PyTorch VGG16 + LPIPS weights into md_jax's LPIPS safetensors file.

On a machine with internet access, fetch the two originals:

    # torchvision's ImageNet VGG16 (the feature extractor LPIPS uses)
    curl -LO https://download.pytorch.org/models/vgg16-397923af.pth
    # LPIPS v0.1 linear layers for VGG (github.com/richzhang/PerceptualSimilarity)
    curl -L -o lpips_vgg_lin.pth \
        https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth

then, with torch installed (`pip install -e ".[test]"` has it):

    python -m md_jax.tools.convert_lpips --vgg=vgg16-397923af.pth --lin=lpips_vgg_lin.pth \
        --out=/data/lpips_vgg16.safetensors

and point `config.perceptual.weights` at the output. `--vgg` also takes a full `lpips.LPIPS`
state dict (keys `net.sliceK.N.weight`), and `--lin` may be the same file.
"""

import re

import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from md_jax.models.lpips import conv_names

# torchvision's `vgg16().features` indices of the 13 convs, in order.
_TORCH_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def convert(vgg_state: dict, lin_state: dict) -> dict[str, np.ndarray]:
  """PyTorch state dicts (name → array) → the flat {"conv1_1.kernel": HWIO, …, "lin0": (C,)}."""
  by_index = {}
  for key, value in vgg_state.items():
    match = re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key)
    if match:
      by_index[(int(match[1]), match[2])] = np.asarray(value, np.float32)
  out = {}
  for name, index in zip(conv_names(), _TORCH_CONV_INDICES):
    if (index, "weight") not in by_index:
      raise KeyError(f"--vgg has no features.{index}.weight (needed for {name})")
    # OIHW → HWIO, made contiguous: safetensors writes a strided view's raw buffer as it lies.
    out[f"{name}.kernel"] = np.ascontiguousarray(by_index[(index, "weight")].transpose(2, 3, 1, 0))
    out[f"{name}.bias"] = by_index[(index, "bias")]
  for k in range(5):
    key = f"lin{k}.model.1.weight"
    if key not in lin_state:
      raise KeyError(f"--lin has no {key}")
    out[f"lin{k}"] = np.asarray(lin_state[key], np.float32).reshape(-1)
  return out


def _load_torch(path: str) -> dict:
  import torch

  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.numpy() for k, v in state.items()}


def define_flags():
  """Defined only when this module runs as a program: the other converters' flags share names."""
  flags.DEFINE_string("vgg", None, "torchvision VGG16 (or lpips.LPIPS) state dict, .pth")
  flags.DEFINE_string("lin", None, "LPIPS linear-layer state dict (vgg.pth), .pth")
  flags.DEFINE_string("out", None, "output .safetensors file")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  vgg = _load_torch(FLAGS.vgg)
  lin = vgg if FLAGS.lin in (None, FLAGS.vgg) else _load_torch(FLAGS.lin)
  save_file(convert(vgg, lin), FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["vgg", "out"])
  app.run(main)

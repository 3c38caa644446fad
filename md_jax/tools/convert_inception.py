"""One-time conversion of pytorch-fid's FID InceptionV3 weights into md_jax's safetensors file.

The weights are the TensorFlow FID network (inception-2015-12-05) as ported by pytorch-fid; its
`pytorch_fid.inception.FID_WEIGHTS_URL`. On a machine with internet access:

    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

then, with torch installed (`pip install -e ".[test]"` has it):

    python -m md_jax.tools.convert_inception --pth=pt_inception-2015-12-05-6726825d.pth \
        --out=/data/fid_inception.safetensors

and give the output to `md_jax.models.inception.load_inception`. The file keeps pytorch-fid's
state-dict keys and PyTorch layouts unchanged (the loader maps them), minus the 1008-way classifier
and BatchNorm's step counters, which the pool3 features never read. torchvision's ImageNet
Inception has the same keys but other weights; its 1000-way classifier gives it away here.
"""

import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from md_jax.models import inception

# The TF 2015 Inception classifies into 1008 classes; torchvision's ImageNet one into 1000.
_FID_CLASSES = 1008


def convert(state: dict) -> dict[str, np.ndarray]:
  """pytorch-fid state dict (name → array) → the feature network's entries, float32, same keys."""
  fc = state.get("fc.weight")
  if fc is not None and fc.shape[0] != _FID_CLASSES:
    raise ValueError(
      f"fc.weight has {fc.shape[0]} classes, not {_FID_CLASSES}: this is not pytorch-fid's FID "
      "Inception (torchvision's ImageNet Inception gives different FIDs)"
    )
  expected = inception.expected_torch_shapes()
  missing = [key for key in expected if key not in state]
  if missing:
    raise KeyError(f"state dict has no {missing[0]} ({len(missing)} feature-network keys missing)")
  # Contiguous copies: safetensors writes a strided view's raw buffer as it lies.
  return {key: np.ascontiguousarray(state[key], np.float32) for key in expected}


def _load_torch(path: str) -> dict:
  import torch

  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.numpy() for k, v in state.items()}


def convert_file(pth: str, out: str) -> None:
  save_file(convert(_load_torch(pth)), out)


def define_flags():
  """Defined only when this module runs as a program: the other converters' flags share names."""
  flags.DEFINE_string("pth", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  flags.DEFINE_string("out", None, "output .safetensors file")


def main(argv):
  del argv
  convert_file(flags.FLAGS.pth, flags.FLAGS.out)
  print(f"wrote {flags.FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["pth", "out"])
  app.run(main)

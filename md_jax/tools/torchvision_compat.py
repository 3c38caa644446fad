"""Lets torchvision's Python modules import where its compiled ops cannot load.

The test extras' torchvision (for pytorch-fid's InceptionV3) is, on this project's package
mirror, the CUDA build next to a CPU-only torch: its `_C` library needs `libtorch_cuda.so` and
fails to load, and `import torchvision` then dies registering fake kernels for the missing
`torchvision::nms`/`qnms` ops. transformers and diffusers import torchvision whenever it is
installed, so their models would not import either. Nothing here calls those ops (only
torchvision's pure-Python model definitions are used), so defining the two schemas, when and
only when the compiled library does not provide them, is enough. Called by `tests/conftest.py`
and the benchmarks that import diffusers, before anything imports torchvision.
"""

import contextlib
import glob
import importlib.util
import os

_SCHEMAS = None  # the Library that holds the schemas: alive for the process's life


def _has_nms(torch) -> bool:
  try:
    torch.ops.torchvision.nms  # noqa: B018 — the lookup raises when the op is not registered
    return True
  except (AttributeError, RuntimeError):
    return False


def make_torchvision_importable() -> None:
  global _SCHEMAS
  spec = importlib.util.find_spec("torchvision")
  if spec is None or _SCHEMAS is not None or importlib.util.find_spec("torch") is None:
    return
  import torch

  if _has_nms(torch):
    return
  for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
    with contextlib.suppress(ImportError, OSError):  # what torchvision.extension does
      torch.ops.load_library(path)
  if _has_nms(torch):  # a torchvision built for this torch: nothing to do
    return
  library = torch.library.Library("torchvision", "DEF")
  library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _SCHEMAS = library

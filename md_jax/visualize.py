"""Image grids for TensorBoard and PNG files."""

import io
import pathlib

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] float images → uint8."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles (N, H, W, C) uint8 images into one (rows·H, columns·W, C) image."""
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top : top + h, left : left + w] = image
  return grid


def save_png(image: np.ndarray, path: str | pathlib.Path, text: dict[str, str] | None = None):
  """Writes a uint8 image; `text` goes into the PNG's tEXt metadata (prompts, settings)."""
  from PIL import PngImagePlugin

  info = PngImagePlugin.PngInfo()
  for key, value in (text or {}).items():
    info.add_text(key, value)
  path = epath.Path(path)  # a gs:// workdir's samples go to the bucket, not a local gs:/ folder
  path.parent.mkdir(parents=True, exist_ok=True)
  encoded = io.BytesIO()
  Image.fromarray(image).save(encoded, format="PNG", pnginfo=info)
  path.write_bytes(encoded.getvalue())

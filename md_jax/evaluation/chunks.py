"""An evaluation's per-image results, saved a chunk (one global batch) at a time, so that an
evaluation stopped anywhere resumes after its last complete chunk and ends with the same figures.

    out/chunk_000000.npz   arrays (rows of the chunk's images) + the input position after it
    out/chunk_000001.npz   ...

Each file is written whole under a temporary name and renamed, so a chunk is complete or absent.
Only process 0 writes; every process reads (the directory is shared: a local disk on one
machine, GCS on a pod).
"""

import io
import json
import re

import numpy as np
from etils import epath

from md_jax.infra import files

_NAME = re.compile(r"chunk_(\d{6})\.npz$")
_STATE_KEY = "__input_state__"


class ChunkStore:
  def __init__(self, directory):
    self.directory = epath.Path(directory)

  def path(self, index: int) -> epath.Path:
    return self.directory / f"chunk_{index:06d}.npz"

  def completed(self) -> int:
    """The number of chunks 0, 1, … present without a gap: where a resumed evaluation starts."""
    if not self.directory.exists():
      return 0
    present = {int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.search(p.name))}
    count = 0
    while count in present:
      count += 1
    return count

  def write(self, index: int, arrays: dict[str, np.ndarray], input_state: dict) -> None:
    buffer = io.BytesIO()
    state = np.frombuffer(json.dumps(input_state).encode(), np.uint8)
    np.savez(buffer, **arrays, **{_STATE_KEY: state})
    files.write_whole(self.path(index), buffer.getvalue())

  def read(self, index: int) -> tuple[dict[str, np.ndarray], dict]:
    path = self.path(index)
    try:
      with np.load(io.BytesIO(path.read_bytes())) as data:
        arrays = {k: data[k] for k in data.files if k != _STATE_KEY}
        state = json.loads(bytes(data[_STATE_KEY]).decode())
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"{path}: not a readable evaluation chunk ({e}); delete it to redo") from e
    return arrays, state

  def concatenated(self, count: int) -> dict[str, np.ndarray]:
    """Chunks 0 … count−1, each key's rows concatenated in order."""
    parts = [self.read(i)[0] for i in range(count)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

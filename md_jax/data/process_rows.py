"""Which examples each process reads: its contiguous rows of every global batch.

Global batch k holds examples [k·B, (k+1)·B) of the (shuffled) stream; process p of P reads rows
[p·L, (p+1)·L) of it, L = B / P, and `make_array_from_process_local_data` puts them at exactly
those rows of the global array. So the global batch — its examples *and* their row order, hence
the per-row noise a step draws — is the same whatever the number of processes: a 2-process run
reproduces a 1-process run.
"""

from collections.abc import Sequence

import grain


class ProcessRowsMapDataset(grain.MapDataset):
  def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int,
               process_count: int):  # fmt: skip
    super().__init__(parent)
    if global_batch_size % process_count:
      raise ValueError(
        f"global batch size {global_batch_size} is not divisible by {process_count} processes"
      )
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local
    # Only whole global batches: a process never reads rows of a batch another cannot complete.
    self._length = (len(parent) // global_batch_size) * self._local

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    batch, row = divmod(index, self._local)
    return batch * self._global + self._offset + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices: Sequence[int]):
    return self._parent._getitems([self._parent_index(i) for i in indices])

  def __str__(self) -> str:
    return f"ProcessRowsMapDataset(rows {self._offset}+{self._local} of {self._global})"

"""Orbax checkpoints of a stage: train state, data-iterator position and config, saved together.

Layout: `<workdir>/checkpoints/<step>/{state, data, config, checksums}`. Saves are asynchronous
(the step loop goes on while arrays are written) and atomic (a step directory appears only when
complete), so a preempted run resumes from its last complete step. Restores take the abstract
state with its target shardings, so a checkpoint written on one mesh is resharded onto another.
Every restore verifies the checksums the save recorded (`infra/fingerprints.py`): a checkpoint
that reads back other numbers than were saved raises `CorruptCheckpointError`, never loads.
"""

import os
import sys
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from md_jax.infra import fingerprints


class CheckpointError(ValueError):
  pass


class CorruptCheckpointError(CheckpointError):
  """A checkpoint whose bytes no longer read back as what was saved (checksums, unreadable
  files)."""


def _absolute(path) -> epath.Path:
  """Orbax wants absolute paths; a user's `--workdir=workdirs/x` is relative to where they are."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def _handlers():
  # Named up front, so a fresh manager can read a checkpoint's metadata before restoring it.
  return {
    "state": ocp.StandardCheckpointHandler(),
    "data": ocp.JsonCheckpointHandler(),
    "config": ocp.JsonCheckpointHandler(),
    "checksums": ocp.JsonCheckpointHandler(),
  }


class Checkpointer:
  def __init__(
    self, directory, *, max_to_keep: int | None = 3, async_save: bool = True, keep_steps=()
  ):
    """`max_to_keep`: the newest checkpoints kept (None: all); `keep_steps`: steps kept besides
    them, whatever their age (e.g. each distillation round's last)."""
    self.directory = _absolute(directory)
    keeping = {"max_to_keep": max_to_keep}
    if keep_steps:
      from orbax.checkpoint import checkpoint_managers as policies

      keeping = {"preservation_policy": policies.AnyPreservationPolicy(
        [policies.LatestN(max_to_keep), policies.CustomSteps(keep_steps)]
      )}  # fmt: skip
    options = ocp.CheckpointManagerOptions(
      **keeping, enable_async_checkpointing=async_save, create=True
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=_handlers()
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config) -> None:
    """Starts an async save of `state` (sharded arrays), the data position, the config and their
    checksums (computed on the devices before the save returns)."""
    config_dict = config.to_dict()
    checksums = {
      "state": fingerprints.of_device_tree(state),
      "data": fingerprints.of_json(data_state),
      "config": fingerprints.of_json(config_dict),
    }
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict),
        checksums=ocp.args.JsonSave(checksums),
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state):
    """Restores (state, data_state) at `step` onto the shardings carried by `abstract_state`.

    Shapes are checked against the checkpoint's metadata first, so a model config that does not
    match the checkpoint fails with the offending parameters named, not deep inside Orbax; then
    what was read is checked against the checksums saved with it.
    """
    where = self.directory / str(step)
    metadata = _reading(where, lambda: self._manager.item_metadata(step)["state"])
    _check_shapes(metadata, abstract_state, where)
    items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
    if _has_checksums(where):
      items["checksums"] = ocp.args.JsonRestore()
    try:
      restored = _reading(
        where, lambda: self._manager.restore(step, args=ocp.args.Composite(**items))
      )
    except CorruptCheckpointError as e:
      if "tree structures do not match" not in str(e):
        raise
      # Every array matched, so what differs is the tree around them: e.g. a state field with no
      # arrays that this code added after the checkpoint was written.
      raise CheckpointError(
        str(e).replace("could not be read", "could not be restored into this state")
      ) from e.__cause__
    state, data = restored["state"], restored["data"]
    if "checksums" in items:
      saved = restored["checksums"]
      _verify(where, "state", saved["state"], fingerprints.of_device_tree(state))
      _verify(where, "data", saved["data"], fingerprints.of_json(data))
    else:
      logging.warning(
        "%s has no checksums (written before they were recorded): not verified", where
      )
    return state, data

  def set_aside(self, step: int, reason: str) -> epath.Path:
    """Renames checkpoint `step` to `<step>.<reason>` (kept, never deleted; no longer a step)."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.{reason}"
    if jax.process_index() == 0:
      source.rename(target)
    _sync(f"md_jax_set_aside_{step}")
    self._manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice arrived (multi-host TPU maintenance)."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _one_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())}"[:600]


def _reading(where, read):
  """`read()`, with any failure to read the checkpoint's bytes (unparseable metadata, a TensorStore
  DATA_LOSS, a missing chunk) raised as one `CorruptCheckpointError` naming the checkpoint."""
  _hold_late_read_completions()
  try:
    return read()
  except CheckpointError:
    raise
  except Exception as e:  # whatever the storage layer raises, named as one error
    raise CorruptCheckpointError(f"checkpoint {where} could not be read: {_one_line(e)}") from e


def _hold_late_read_completions() -> None:
  """A failed Orbax restore closes its event loop while TensorStore still completes the reads it
  had started; each completion then schedules onto the closed loop from a TensorStore thread, and
  Python prints a `RuntimeError: Event loop is closed` traceback per read ("Exception ignored"),
  before, around and after the error that matters, for as long as the reads drain. Only that one
  exception is logged at debug level instead; every other unraisable exception reaches the hook
  that was installed before. Installed before the read (the first completion can race the error
  out of `restore`) and kept: completions can arrive until the process exits."""
  previous = sys.unraisablehook
  if getattr(previous, "_md_jax_late_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      logging.debug("A TensorStore read completed after its restore had failed: %s", error)
      return
    previous(unraisable)

  hook._md_jax_late_reads = True
  sys.unraisablehook = hook


def _has_checksums(where: epath.Path) -> bool:
  return (where / "checksums").exists()


def _verify(where, item: str, saved, found) -> None:
  if isinstance(saved, dict):
    wrong = fingerprints.differences(saved, found)
  else:
    wrong = [] if saved == found else [item]
  if wrong:
    raise CorruptCheckpointError(
      f"checkpoint {where} does not read back what was saved: "
      + _listing("checksum mismatch", wrong)
    )


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _check_shapes(metadata, abstract_state, where) -> None:
  saved = _shape_tree(metadata)
  mismatched, missing = [], []
  for path, target in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    found = saved.pop(fingerprints.path_keys(path), None)
    if found is None:
      missing.append(jax.tree_util.keystr(path))
    elif tuple(found) != tuple(target.shape):
      mismatched.append(
        f"{jax.tree_util.keystr(path)} is {tuple(found)} there but {tuple(target.shape)} here"
      )
  unexpected = ["/".join(k) for k in saved]
  problems = [_listing("shape mismatch", mismatched), _listing("missing", missing)]
  problems = [p for p in [*problems, _listing("unexpected", unexpected)] if p]
  if problems:
    raise CheckpointError(
      f"checkpoint {where} does not match the configured model; " + "; ".join(problems)
    )


def _listing(kind: str, items: list[str], limit: int = 6) -> str:
  if not items:
    return ""
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return f"{kind} ({len(items)}): {', '.join(items[:limit])}{more}"


def _is_array(x) -> bool:
  """An array leaf of a checkpoint's metadata tree (metadata nodes are dicts)."""
  return hasattr(x, "shape") and not isinstance(x, dict)


def _shape_tree(metadata) -> dict:
  """{normalised path: shape} for every array in a checkpoint's metadata tree."""
  flat = jax.tree_util.tree_flatten_with_path(metadata, is_leaf=_is_array)[0]
  return {fingerprints.path_keys(path): tuple(leaf.shape) for path, leaf in flat if _is_array(leaf)}


def resolve_checkpoint(path: str, what: str = "config.init_checkpoint") -> tuple[epath.Path, int]:
  """A checkpoint path → (checkpoints directory, step); `what` names the flag or key in errors.

  Accepts a stage's workdir (its latest step), its `checkpoints/` directory, or one step's
  directory (`.../checkpoints/1000`).
  """
  p = _absolute(path)
  if not p.exists():
    raise FileNotFoundError(f"{what}={path!r} does not exist")
  if (p / "checkpoints").exists():
    p = p / "checkpoints"
  if p.name.isdigit() and (p / "state").exists():
    return p.parent, int(p.name)
  steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / "state").exists())
  if not steps:
    raise FileNotFoundError(f"{what}={path!r} holds no complete checkpoint")
  return p, steps[-1]


def completed_step(workdir) -> int | None:
  """The latest complete checkpoint step in a stage's workdir, None when it has none yet."""
  directory = _absolute(workdir) / "checkpoints"
  if not directory.exists():
    return None
  steps = [int(c.name) for c in directory.iterdir() if c.name.isdigit() and (c / "state").exists()]
  return max(steps, default=None)


def load_state_tree(path: str, what: str = "config.init_checkpoint"):
  """The saved state of another stage's checkpoint as nested dicts of host arrays.

  A new stage picks what it needs from it (e.g. the EMA params of a diffusion run for UFOGen's
  generator and discriminator) and places it with its own shardings.
  """
  directory, step = resolve_checkpoint(path, what)
  where = f"{directory / str(step)} ({what}={path!r})"
  with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
    metadata = _reading(where, lambda: manager.item_metadata(step)["state"])
    # Host numpy targets: the source may come from another mesh, device count or process count.
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata, is_leaf=_is_array)
    items = {"state": ocp.args.StandardRestore(target)}
    if _has_checksums(directory / str(step)):
      items["checksums"] = ocp.args.JsonRestore()
    restored = _reading(where, lambda: manager.restore(step, args=ocp.args.Composite(**items)))
  if "checksums" in restored:
    _verify(where, "state", restored["checksums"]["state"], fingerprints.of_host_tree(
      restored["state"]))  # fmt: skip
  return restored["state"], step


def saved_config(path: str, what: str = "config.init_checkpoint") -> dict:
  """The config a checkpoint was written with (samplers and export rebuild the model from it)."""
  directory, step = resolve_checkpoint(path, what)
  where = f"{directory / str(step)} ({what}={path!r})"
  items = {"config": ocp.args.JsonRestore()}
  if _has_checksums(directory / str(step)):
    items["checksums"] = ocp.args.JsonRestore()
  with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
    restored = _reading(where, lambda: manager.restore(step, args=ocp.args.Composite(**items)))
  if "checksums" in restored:
    _verify(where, "config", restored["checksums"]["config"], fingerprints.of_json(
      restored["config"]))  # fmt: skip
  return restored["config"]


def copy_into(source, target, *, strict: bool = True):
  """A fresh host copy of `source` (nested dicts, e.g. from `load_state_tree`) in `target`'s
  structure and dtypes.

  `strict` raises on a leaf that is missing from `source` or has another shape, naming it; without
  it such leaves keep `target`'s values (e.g. a pruned decoder initialised from the full one
  where shapes allow).
  """

  def pick(path, t):
    node = source
    for key in path:
      name = getattr(key, "key", getattr(key, "name", key))
      node = node.get(name) if isinstance(node, Mapping) else None
      if node is None:
        break
    if node is not None and tuple(node.shape) == tuple(t.shape):
      return np.array(node, dtype=t.dtype)
    if strict:
      found = "is missing" if node is None else f"has shape {tuple(node.shape)}"
      raise ValueError(
        f"{jax.tree_util.keystr(path)} {found} in the source checkpoint or file, the model "
        f"expects {tuple(t.shape)}"
      )
    return np.array(t)

  return jax.tree_util.tree_map_with_path(pick, nn.meta.unbox(target))


def open_checkpoint(path: str, what: str = "--checkpoint", stages=None):
  """(config, state tree, step) of any stage's checkpoint: a workdir (its latest step), its
  `checkpoints/` directory or one step's directory. `stages`: the `config.stage`s the caller
  reads; another is one error naming it, before any array is read. The tree is nested dicts of
  host arrays; which parts a diffusion-family tree holds is in `pipeline/checkpoint_layout.py`."""
  import ml_collections

  config = ml_collections.ConfigDict(saved_config(path, what))
  if stages is not None and config.get("stage") not in stages:
    raise CheckpointError(
      f"{what}={path!r} is a {config.get('stage')!r} checkpoint; expected one of {tuple(stages)}"
    )
  tree, step = load_state_tree(path, what)
  return config, tree, step

"""Orbax checkpoints of a stage: train state, data-iterator position and config, saved together.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}`. Saves are asynchronous (the step
loop goes on while arrays are written) and atomic (a step directory appears only when complete),
so a preempted run resumes from its last complete step. Restores take the abstract state with its
target shardings, so a checkpoint written on one mesh is resharded onto another.
"""

import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(ValueError):
  pass


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
  }


class Checkpointer:
  def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = _absolute(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=_handlers()
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict, config) -> None:
    """Starts an async save of `state` (sharded arrays), the data position and the config."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict()),
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state):
    """Restores (state, data_state) at `step` onto the shardings carried by `abstract_state`.

    Shapes are checked against the checkpoint's metadata first, so a model config that does not
    match the checkpoint fails with the offending parameters named, not deep inside Orbax.
    """
    where = self.directory / str(step)
    _check_shapes(self._manager.item_metadata(step)["state"], abstract_state, where)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
        ),
      )
    except ValueError as e:
      # Every array matched, so what differs is the tree around them: e.g. a state field with no
      # arrays that this code added after the checkpoint was written. Orbax says which, over
      # several lines; one line here, with the checkpoint named.
      detail = " ".join(str(e).split())
      raise CheckpointError(
        f"checkpoint {where} could not be restored into this state: {detail}"
      ) from e
    return restored["state"], restored["data"]

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice arrived (multi-host TPU maintenance)."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _check_shapes(metadata, abstract_state, where) -> None:
  saved = _shape_tree(metadata)
  mismatched, missing = [], []
  for path, target in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    found = saved.pop(_normalise(path), None)
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


def _normalise(path) -> tuple:
  """Tree paths as plain key tuples, so dataclass fields and dict keys compare alike."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_array(x) -> bool:
  """An array leaf of a checkpoint's metadata tree (metadata nodes are dicts)."""
  return hasattr(x, "shape") and not isinstance(x, dict)


def _shape_tree(metadata) -> dict:
  """{normalised path: shape} for every array in a checkpoint's metadata tree."""
  flat = jax.tree_util.tree_flatten_with_path(metadata, is_leaf=_is_array)[0]
  return {_normalise(path): tuple(leaf.shape) for path, leaf in flat if _is_array(leaf)}


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
  with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
    metadata = manager.item_metadata(step)["state"]
    # Host numpy targets: the source may come from another mesh, device count or process count.
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata, is_leaf=_is_array)
    restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
  return restored["state"], step


def saved_config(path: str, what: str = "config.init_checkpoint") -> dict:
  """The config a checkpoint was written with (samplers and export rebuild the model from it)."""
  directory, step = resolve_checkpoint(path, what)
  with ocp.CheckpointManager(directory, item_handlers=_handlers()) as manager:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


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

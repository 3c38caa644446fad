"""LoRA files: a UNet's LoRA factors as a small `.safetensors` file with a manifest, applied at
inference to any UNet of the layout it was trained on (issue 42).

    save_lora("concept.safetensors", factors, rank=4, alpha=4.0, base_params=unet_params)
    factors, manifest = load_lora("concept.safetensors")
    unet_params = apply_loras(unet_params, [("concept.safetensors", 1.0), ("style.st", 0.5)])

Tensors are the factors of `models/lora.py` (`init_lora`), flattened with '/'-joined keys
("innermost/mid_transformer/proj_in/kernel/lora_a"), float as trained. The safetensors metadata
key `md_jax_lora` holds a JSON manifest: format and version, rank, alpha, the target kernels, the
base UNet's layout (every (path, shape, dtype), sorted) and its sha256, and optionally a sha256 of
the base weights. The layout, not the weights, decides where a LoRA applies: one trained on the
diffusion run serves the UFOGen one-step generator finetuned from it (paper Sec. 4, 5.4), whose
weights differ and whose layout does not; the full layout is kept (not only its hash) so that a
mismatch names the first path that differs.

Merged: W = W0 + Σᵢ sᵢ·(αᵢ/rᵢ)·Aᵢ·Bᵢ, a conv or multi-axis kernel adapted as the matrix
(prod(shape[:-1]), shape[-1]), as `models/lora.py` trains it. Merging once costs nothing per step,
and the jitted sampler sees ordinary params (no recompilation per LoRA or scale).

A file may also hold its concept token's own embedding rows, trained with the factors (pivotal
tuning: DreamBooth's text part as textual inversion): the tensor `TOKEN_ROWS_KEY` and the
manifest's "token_embedding" {"ids", "table_shape"}. `apply_to` sets those rows of the text
encoder's token table as it merges the factors into the UNet (`apply_token_rows`); the rows are
a definition of the token, not a delta, so a LoRA's scale weights its factors only.
"""

import hashlib
import json
import os

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from md_jax.infra import files
from md_jax.models import lora as lora_lib

FORMAT = "md_jax.lora"
VERSION = 1
MANIFEST_KEY = "md_jax_lora"  # the safetensors metadata entry holding the manifest's JSON
FACTORS = ("lora_a", "lora_b")
REQUIRED = ("format", "version", "rank", "alpha", "targets", "base_layout", "base_layout_sha256")
TOKEN_ROWS_KEY = "text_encoder/token_embedding/rows"  # the concept token's trained rows


def _flat(tree) -> dict[str, object]:
  """{'a/b/kernel': leaf} of a nested dict (boxed leaves unboxed)."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _nested(flat: dict[str, object]) -> dict:
  out: dict = {}
  for key, value in flat.items():
    *parents, name = key.split("/")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = value
  return out


def layout(params) -> list[list]:
  """[[path, shape, dtype], ...] of a params tree, sorted by path: what a LoRA applies to."""
  return sorted(
    [path, list(np.shape(leaf)), str(np.dtype(leaf.dtype))] for path, leaf in _flat(params).items()
  )


def layout_hash(params_or_layout) -> str:
  """sha256 of `layout(params)` (or of a layout list) as compact JSON."""
  entries = params_or_layout if isinstance(params_or_layout, list) else layout(params_or_layout)
  text = json.dumps([[p, list(s), d] for p, s, d in entries], separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(params) -> str:
  """sha256 over every leaf's path, shape, dtype and bytes, in path order: which weights exactly."""
  digest = hashlib.sha256()
  for path, leaf in sorted(_flat(params).items()):
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{path}:{array.shape}:{array.dtype};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _factor_kernels(factors, where: str) -> dict[str, dict]:
  """{kernel path: {"lora_a": A, "lora_b": B}} of a factors tree (`init_lora`'s structure)."""
  flat = _flat(factors)
  kernels: dict[str, dict] = {}
  for key, value in flat.items():
    kernel, _, name = key.rpartition("/")
    if name not in FACTORS or not kernel:
      raise ValueError(f"{where}: key {key!r} is not a kernel's lora_a or lora_b")
    kernels.setdefault(kernel, {})[name] = value
  return kernels


def _expected_shapes(kernel_shape, rank: int) -> dict[str, tuple[int, int]]:
  return {
    "lora_a": (int(np.prod(kernel_shape[:-1])), rank),
    "lora_b": (rank, int(kernel_shape[-1])),
  }


def _check_factors(kernels: dict, targets, base_shapes: dict, rank: int, where: str) -> None:
  """Every target has both factors, of the shapes its base kernel and the rank give; no other."""
  for target in targets:
    if target not in base_shapes:
      raise ValueError(f"{where}: target {target!r} is not a kernel of the base UNet")
    for name, shape in _expected_shapes(base_shapes[target], rank).items():
      key = f"{target}/{name}"
      found = kernels.get(target, {}).get(name)
      if found is None:
        raise ValueError(f"{where}: missing key {key!r}")
      if tuple(np.shape(found)) != shape:
        raise ValueError(
          f"{where}: key {key!r} is {tuple(np.shape(found))}; rank {rank} on the base's "
          f"{tuple(base_shapes[target])} kernel needs {shape}"
        )
  extra = sorted(set(kernels) - set(targets))
  if extra:
    key = f"{extra[0]}/{sorted(kernels[extra[0]])[0]}"
    raise ValueError(f"{where}: unexpected key {key!r} (not one of the targets)")


def save_lora(path, factors, *, rank: int, alpha: float, base_params, targets=None,
              hash_weights: bool = True, info: dict | None = None,
              token_embedding: dict | None = None) -> dict:  # fmt: skip
  """Writes `factors` (`init_lora`'s tree, trained) to a `.safetensors` file at `path` (local or
  gs://, written whole) and returns its manifest. `base_params`: the UNet params they were
  trained on (its layout, and with `hash_weights` its weights' hash, go into the manifest);
  `targets`: the adapted kernels' paths, checked against the factors (default: theirs); `info`:
  JSON-able extras kept in the manifest (e.g. the concept's token, the training step);
  `token_embedding`: {"ids", "rows" (len(ids), width), "table_shape"} of the token's trained
  embedding rows and the text encoder table they belong in."""
  import safetensors.numpy

  where = f"save_lora({os.fspath(path)!r})"
  if rank <= 0:
    raise ValueError(f"{where}: rank must be positive, got {rank}")
  kernels = _factor_kernels(factors, where)
  targets = sorted(kernels) if targets is None else sorted(targets)
  base_layout = layout(base_params)
  _check_factors(kernels, targets, {p: s for p, s, _ in base_layout}, rank, where)
  manifest = {
    "format": FORMAT,
    "version": VERSION,
    "rank": int(rank),
    "alpha": float(alpha),
    "targets": targets,
    "kernel_as_matrix": "(prod(shape[:-1]), shape[-1])",
    "base_layout_sha256": layout_hash(base_layout),
    "base_layout": base_layout,
  }
  if hash_weights:
    manifest["base_weights_sha256"] = weights_hash(base_params)
  if info:
    manifest["info"] = info
  tensors = {
    f"{kernel}/{name}": np.ascontiguousarray(jax.device_get(kernels[kernel][name]))
    for kernel in targets
    for name in FACTORS
  }
  if token_embedding:
    ids = [int(i) for i in token_embedding["ids"]]
    rows = np.ascontiguousarray(jax.device_get(token_embedding["rows"]))
    table_shape = [int(n) for n in token_embedding["table_shape"]]
    _check_token_rows(ids, rows, table_shape, where)
    manifest["token_embedding"] = {"ids": ids, "table_shape": table_shape}
    tensors[TOKEN_ROWS_KEY] = rows
  data = safetensors.numpy.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})
  files.write_whole(path, data)
  return manifest


def _check_token_rows(ids, rows, table_shape, where: str) -> None:
  if len(table_shape) != 2 or not ids or not all(0 <= i < table_shape[0] for i in ids):
    raise ValueError(f"{where}: token ids {ids} are not rows of a {table_shape} token table")
  if tuple(np.shape(rows)) != (len(ids), table_shape[1]):
    raise ValueError(
      f"{where}: key {TOKEN_ROWS_KEY!r} is {tuple(np.shape(rows))}; {len(ids)} token ids of a "
      f"{table_shape} table need {(len(ids), table_shape[1])}"
    )


def _header(data: bytes, where: str) -> dict:
  """The safetensors JSON header (8-byte little-endian length, then JSON)."""
  if len(data) < 8:
    raise ValueError(f"{where}: not a safetensors file ({len(data)} bytes)")
  size = int.from_bytes(data[:8], "little")
  try:
    header = json.loads(data[8 : 8 + size])
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{where}: not a safetensors file (its header does not parse: {e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{where}: not a safetensors file (its header is not a JSON object)")
  return header


def load_lora(path) -> tuple[dict, dict]:
  """(factors, manifest) of a LoRA file; `manifest["file"]` is `path`, for later errors. A file
  that is missing, not safetensors, not an md_jax LoRA, or lacks or misshapes a factor is one
  ValueError naming the file (and the key)."""
  import safetensors.numpy

  where = f"LoRA file {os.fspath(path)!r}"
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError as e:
    raise ValueError(f"{where} does not exist") from e
  except OSError as e:
    raise ValueError(f"{where}: cannot read it ({e})") from e
  metadata = _header(data, where).get("__metadata__") or {}
  if MANIFEST_KEY not in metadata:
    raise ValueError(f"{where}: not an md_jax LoRA file (no {MANIFEST_KEY!r} manifest)")
  try:
    manifest = json.loads(metadata[MANIFEST_KEY])
  except ValueError as e:
    raise ValueError(f"{where}: its {MANIFEST_KEY!r} manifest is not JSON ({e})") from e
  missing = [k for k in REQUIRED if not isinstance(manifest, dict) or k not in manifest]
  if missing:
    raise ValueError(f"{where}: its manifest has no key {missing[0]!r}")
  if manifest["format"] != FORMAT or manifest["version"] != VERSION:
    raise ValueError(
      f"{where}: manifest is {manifest['format']!r} version {manifest['version']!r}; this reads "
      f"{FORMAT!r} version {VERSION}"
    )
  if layout_hash(manifest["base_layout"]) != manifest["base_layout_sha256"]:
    raise ValueError(f"{where}: key 'base_layout' does not hash to its 'base_layout_sha256'")
  try:
    tensors = safetensors.numpy.load(data)
  except Exception as e:  # safetensors' own error type: a truncated or inconsistent file
    raise ValueError(f"{where}: its tensors do not load ({' '.join(str(e).split())})") from e
  rows, token = tensors.pop(TOKEN_ROWS_KEY, None), manifest.get("token_embedding")
  if (rows is None) != (token is None):
    what = "no key 'token_embedding'" if token is None else f"no key {TOKEN_ROWS_KEY!r}"
    raise ValueError(f"{where}: holds token rows without their ids ({what})")
  if token is not None:
    _check_token_rows(token["ids"], rows, token["table_shape"], where)
    manifest["token_rows"] = rows  # in memory only, beside the JSON manifest's ids
  base_shapes = {p: s for p, s, _ in manifest["base_layout"]}
  kernels = _factor_kernels(_nested(tensors), where) if tensors else {}
  _check_factors(kernels, manifest["targets"], base_shapes, int(manifest["rank"]), where)
  manifest["file"] = os.fspath(path)
  return _nested(tensors), manifest


def layout_mismatch(found: list, wanted: list) -> str | None:
  """The first (path order) difference between two layouts, in words; None where they agree."""
  found_map = {p: (tuple(s), d) for p, s, d in found}
  wanted_map = {p: (tuple(s), d) for p, s, d in wanted}
  for path in sorted(set(found_map) | set(wanted_map)):
    here, there = found_map.get(path), wanted_map.get(path)
    if here == there:
      continue
    if here is None:
      return f"{path} {there[0]} {there[1]} is not in this UNet"
    if there is None:
      return f"this UNet's {path} {here[0]} {here[1]} is not in the LoRA's base"
    return f"{path} is {here[0]} {here[1]} here, {there[0]} {there[1]} in the LoRA's base"
  return None


def check_applies(unet_params, manifest: dict, unet_layout: list | None = None) -> None:
  """One error naming the file and the first differing path where `manifest`'s base layout is
  not that of `unet_params`."""
  unet_layout = unet_layout if unet_layout is not None else layout(unet_params)
  if layout_hash(unet_layout) == manifest["base_layout_sha256"]:
    return
  what = manifest.get("file", "(in memory)")
  difference = layout_mismatch(unet_layout, manifest["base_layout"]) or "the layout hash differs"
  raise ValueError(f"LoRA file {what!r} was made for another UNet layout: {difference}")


def apply_loras(unet_params, loras):
  """`unet_params` with every LoRA of `loras` = [(lora, scale), ...] merged: W0 + Σ s·(α/r)·A·B.
  A lora is a file path or a `load_lora` (factors, manifest) pair; one made for another layout
  is an error naming it (`check_applies`). Returns host arrays (numpy for a numpy tree)."""
  loras = list(loras)
  if not loras:
    return unet_params
  unet_params = nn.meta.unbox(unet_params)
  unet_layout = layout(unet_params)
  weighted = []
  for item, scale in loras:
    factors, manifest = load_lora(item) if isinstance(item, (str, os.PathLike)) else item
    check_applies(unet_params, manifest, unet_layout)
    try:
      scale = float(scale)
    except (TypeError, ValueError) as e:
      raise ValueError(f"LoRA file {manifest.get('file')!r}: scale {scale!r} is no number") from e
    weighted.append((factors, scale * float(manifest["alpha"]) / int(manifest["rank"])))
  return lora_lib.merge_weighted(unet_params, weighted)


def _loaded(loras) -> list:
  """[((factors, manifest), scale), ...], each file path loaded."""
  return [
    (load_lora(item) if isinstance(item, (str, os.PathLike)) else item, scale)
    for item, scale in loras
  ]


def apply_token_rows(text_encoder_params, loras):
  """The text encoder with each LoRA's trained token rows (where a file holds them) set in its
  token table; a table of another shape, or two files setting the same token id, is one error
  naming the file(s). Returns host arrays."""
  loaded = [(m, m["token_rows"]) for (_, m), scale in _loaded(loras) if "token_rows" in m]
  if not loaded:
    return text_encoder_params
  params = nn.meta.unbox(text_encoder_params)
  table = np.array(jax.device_get(params["token_embedding"]["embedding"]))  # a copy
  set_by: dict[int, str] = {}
  for manifest, rows in loaded:
    what, spec = manifest.get("file", "(in memory)"), manifest["token_embedding"]
    if list(table.shape) != list(spec["table_shape"]):
      raise ValueError(
        f"LoRA file {what!r} sets rows of a {spec['table_shape']} token table; this text "
        f"encoder's is {list(table.shape)}"
      )
    for token_id in spec["ids"]:
      if token_id in set_by:
        raise ValueError(f"LoRA files {set_by[token_id]!r} and {what!r} both set token {token_id}")
      set_by[token_id] = what
    table[spec["ids"]] = rows
  embedding = {**params["token_embedding"], "embedding": table}
  return {**params, "token_embedding": embedding}


def apply_to(params, loras):
  """`params` (`InferenceParams`) with `loras` = [(lora, scale), ...] applied: their factors
  merged into the UNet (`apply_loras`) and their tokens' rows set in the text encoder
  (`apply_token_rows`)."""
  loaded = _loaded(loras)
  if not loaded:
    return params
  return params.replace(
    unet=apply_loras(params.unet, loaded),
    text_encoder=apply_token_rows(params.text_encoder, loaded),
  )


def describe(manifest: dict, scale: float) -> dict:
  """What `generate`'s settings record of one applied LoRA."""
  return {
    "file": manifest.get("file"),
    "scale": float(scale),
    "rank": int(manifest["rank"]),
    "alpha": float(manifest["alpha"]),
    "targets": len(manifest["targets"]),
    "base_layout_sha256": manifest["base_layout_sha256"],
    "token_ids": (manifest.get("token_embedding") or {}).get("ids"),
  }

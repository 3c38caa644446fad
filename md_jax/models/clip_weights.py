"""Loads Hugging Face CLIP text-encoder weights (safetensors) into `CLIPTextEncoder`.

Where the real weights go: nothing is downloaded at run time. Copy the files of
`openai/clip-vit-large-patch14` (config.json, model.safetensors, vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) into a local directory, e.g. with
`huggingface-cli download openai/clip-vit-large-patch14 --local-dir /data/clip-vit-large-patch14`
on a machine with internet access, and point the config at that directory. The same directory
feeds the tokenizer (`transformers.CLIPTokenizer.from_pretrained(dir)`). Also accepted: a diffusers
`text_encoder/` folder, a `CLIPTextModel` saved by transformers (with or without the `text_model.`
key prefix), and sharded checkpoints with a `model.safetensors.index.json`. Vision-tower and
projection weights in a full `CLIPModel` file are skipped without being read.

`params` come back unboxed (plain arrays, no `nn.LogicallyPartitioned` wrappers), because the
encoder is frozen and only ever applied. Their logical axes come from `abstract_params(module)`
and their placement from `param_shardings(module, mesh, rules)`; `load_clip_text_encoder(...,
mesh=mesh)` places them with those shardings directly.
"""

import json
import os
import struct
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from safetensors import safe_open

from md_jax.infra import sharding
from md_jax.models.text_encoder import CLIPTextEncoder

_PREFIX = "text_model."
_TOWER_NAMESPACES = ("embeddings.", "encoder.", "final_layer_norm.")
# A non-persistent buffer that older transformers versions wrote into checkpoints.
_IGNORED_KEYS = frozenset({"embeddings.position_ids"})


def read_hf_config(path: str) -> dict:
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(
      f"{config_file} not found: expected a local Hugging Face CLIP directory (see the "
      "md_jax.models.clip_weights docstring for which files to put there)"
    )
  with open(config_file) as f:
    return json.load(f)


def abstract_params(module: CLIPTextEncoder):
  """Shapes, dtypes and logical axes of the params, without allocating them."""
  ids = jax.ShapeDtypeStruct((1, module.max_length), jnp.int32)
  return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def param_shardings(module: CLIPTextEncoder, mesh: Mesh, rules=None):
  """`NamedSharding`s for the (unboxed) params on `mesh`, from their logical axes."""
  return sharding.logical_to_shardings(
    abstract_params(module), mesh, sharding.logical_axis_rules(rules)
  )


def _hf_key(path: tuple[str, ...]) -> str:
  """Flax param path -> CLIPTextModel key (without the `text_model.` prefix)."""
  *modules, leaf = path
  if modules == ["token_embedding"]:
    return "embeddings.token_embedding.weight"
  if not modules and leaf == "position_embedding":
    return "embeddings.position_embedding.weight"
  suffix = "bias" if leaf == "bias" else "weight"  # kernel, scale -> weight.
  if modules[0].startswith("layers_"):
    modules = ["encoder", "layers", modules[0].removeprefix("layers_"), *modules[1:]]
  return ".".join([*modules, suffix])


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape PyTorch stores for a param of Flax shape `shape`: Linear weights are (out, in)."""
  return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


class _SafetensorsReader:
  """Reads tensors by name across one file or an index of shards, as numpy arrays.

  Only headers are read up front, so skipped tensors (a CLIPModel's vision tower) cost nothing.
  """

  def __init__(self, path: str):
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
      self.description, files = single, [single]
    elif os.path.isfile(index):
      self.description = index
      with open(index) as f:
        files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    else:
      raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {path} (PyTorch .bin "
        "checkpoints are not read; the Hugging Face repos ship safetensors)"
      )
    self._info = {}  # key -> (file, shape, dtype name)
    for file in files:
      with safe_open(file, framework="np") as f:
        names = f.keys()  # safe_open handles are not iterable.
        for key in names:
          tensor = f.get_slice(key)
          self._info[key] = (file, tuple(tensor.get_shape()), tensor.get_dtype())

  def keys(self) -> list[str]:
    return list(self._info)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info[key][1]

  def get(self, key: str) -> np.ndarray:
    file, _, dtype = self._info[key]
    if dtype == "BF16":
      return _read_bf16(file, key)  # safetensors' numpy backend has no bfloat16.
    with safe_open(file, framework="np") as f:
      return f.get_tensor(key)


def _read_bf16(file: str, key: str) -> np.ndarray:
  # The safetensors layout: u64 header size, JSON header with byte offsets, then raw data.
  with open(file, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    info = json.loads(f.read(header_size))[key]
    start, end = info["data_offsets"]
    f.seek(8 + header_size + start)
    data = f.read(end - start)
  return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def convert_state_dict(reader, module: CLIPTextEncoder, source: str) -> dict:
  """Maps CLIPTextModel tensors onto the module's param tree (nested dict of numpy arrays).

  All problems are collected first so one error says everything wrong with a checkpoint (a
  config that does not match its weights usually breaks many keys at once).
  """
  keys = reader.keys()
  prefixed = any(k.startswith(_PREFIX) for k in keys)
  tower = {}
  for k in keys:
    if prefixed:
      if k.startswith(_PREFIX):
        tower[k.removeprefix(_PREFIX)] = k
    elif k.startswith(_TOWER_NAMESPACES):
      tower[k] = k
  prefix = _PREFIX if prefixed else ""

  flat_abstract = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(module)))
  missing, mismatched, flat_params = [], [], {}
  for path, leaf in flat_abstract.items():
    name = _hf_key(path)
    expected = _torch_shape(path, leaf.shape)
    if name not in tower:
      missing.append(f"{prefix}{name} {expected}")
      continue
    found = reader.shape(tower[name])
    if found != expected:
      mismatched.append(f"{tower[name]}: checkpoint {found}, config expects {expected}")
      continue
    value = reader.get(tower[name])
    if path[-1] == "kernel":
      value = value.T
    flat_params[path] = np.asarray(value, dtype=leaf.dtype)

  used = {_hf_key(path) for path in flat_abstract}
  unexpected = sorted(tower[n] for n in tower if n not in used and n not in _IGNORED_KEYS)
  if missing or mismatched or unexpected:
    lines = [f"{source} does not match the CLIP text encoder built from its config.json:"]
    for title, items in (("missing", missing), ("shape mismatch", mismatched)):
      lines += [f"  {title} ({len(items)}):", *(f"    {item}" for item in items)] if items else []
    if unexpected:
      lines += [f"  unexpected ({len(unexpected)}):", *(f"    {k}" for k in unexpected)]
    raise ValueError("\n".join(lines))
  return traverse_util.unflatten_dict(flat_params)


def _place(params, shardings):
  # make_array_from_callback only reads the slices each process owns, so this works on a pod
  # where every host has read the same (small) checkpoint.
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), params, shardings
  )


def load_clip_text_encoder(
  path: str,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  mesh: Mesh | None = None,
  logical_axis_rules=None,
) -> tuple[CLIPTextEncoder, Mapping]:
  """Builds the encoder from `path/config.json` and loads `path/model.safetensors` into it.

  Returns `(module, params)` with plain (unboxed) params in `param_dtype`, ready for
  `module.apply({"params": params}, input_ids)`. Without `mesh` they live on the default device
  (host numpy arrays would be copied to it on every jitted call); with `mesh` they are global
  `jax.Array`s sharded by their logical axes under `logical_axis_rules` (the config's rules;
  defaults from md_jax.infra.sharding).
  Raises ValueError listing every missing, unexpected and shape-mismatched key.
  """
  path = os.fspath(path)
  module = CLIPTextEncoder.from_hf_config(
    read_hf_config(path), dtype=dtype, param_dtype=param_dtype
  )
  reader = _SafetensorsReader(path)
  params = convert_state_dict(reader, module, reader.description)
  if mesh is None:
    return module, jax.device_put(params)
  return module, _place(params, param_shardings(module, mesh, logical_axis_rules))

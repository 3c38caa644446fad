"""Loads Hugging Face CLIP weights (safetensors): the text encoder into `CLIPTextEncoder`, a
full two-tower CLIPModel (CLIP score) into `clip_vision.CLIPModel` (`load_clip_model`).

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
from md_jax.models.clip_vision import CLIPModel, abstract_clip_params
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


# --- the full CLIPModel (both towers and projections), for CLIP score ---------------------------

_VISION_PREFIX = "vision_model."
_VISION_EMBEDDINGS = {
  ("patch_embedding", "kernel"): "embeddings.patch_embedding.weight",
  ("class_embedding",): "embeddings.class_embedding",
  ("position_embedding",): "embeddings.position_embedding.weight",
}
# Non-persistent buffers that older transformers versions wrote into CLIPModel checkpoints.
_IGNORED_MODEL_KEYS = frozenset(
  {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
)


def _vision_hf_key(path: tuple[str, ...]) -> str:
  """Flax param path inside the vision tower -> CLIPVisionModel key (without `vision_model.`)."""
  if tuple(path) in _VISION_EMBEDDINGS:
    return _VISION_EMBEDDINGS[tuple(path)]
  return _hf_key(path)  # Blocks and norms follow the text tower's rule.


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in Flax layout: Linear (out, in) -> (in, out), Conv OIHW -> HWIO."""
  if path[-1] == "kernel":
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def _torch_layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return _torch_shape(path, shape)


def clip_model_hf_keys(model: CLIPModel) -> dict[tuple[str, ...], str]:
  """Every Flax param path of `model` -> its full HF CLIPModel key."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_clip_params(model)))
  keys = {}
  for path in flat:
    tower, *rest = path
    if tower == "text_model":
      keys[path] = _PREFIX + _hf_key(tuple(rest))
    elif tower == "vision_model":
      keys[path] = _VISION_PREFIX + _vision_hf_key(tuple(rest))
    elif tower == "logit_scale":
      keys[path] = "logit_scale"
    else:  # text_projection / visual_projection kernels.
      keys[path] = f"{tower}.weight"
  return keys


def hf_shapes(model: CLIPModel) -> dict[str, tuple[int, ...]]:
  """The HF state dict's key -> shape that `model`'s params correspond to (PyTorch layout)."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_clip_params(model)))
  return {
    key: _torch_layout(path, flat[path].shape) for path, key in clip_model_hf_keys(model).items()
  }


def convert_clip_model(reader, model: CLIPModel, source: str) -> dict:
  """Maps a CLIPModel checkpoint onto `model`'s param tree (nested dict of numpy arrays).

  The text tower goes through `convert_state_dict` (its errors name the file and keys); the rest
  is checked here, every problem collected into one error, as there.
  """
  text = convert_state_dict(reader, model.text_model, source)
  flat_abstract = traverse_util.flatten_dict(nn.meta.unbox(abstract_clip_params(model)))
  available = set(reader.keys())
  missing, mismatched, flat_params = [], [], {}
  hf_keys = clip_model_hf_keys(model)
  for path, key in hf_keys.items():
    if path[0] == "text_model":
      continue
    leaf = flat_abstract[path]
    expected = _torch_layout(path, leaf.shape)
    if key not in available:
      missing.append(f"{key} {expected}")
      continue
    found = reader.shape(key)
    if found != expected:
      mismatched.append(f"{key}: checkpoint {found}, config expects {expected}")
      continue
    flat_params[path] = np.asarray(_to_flax(path, reader.get(key)), dtype=leaf.dtype)
  used = set(hf_keys.values()) | _IGNORED_MODEL_KEYS
  # Text-tower keys were checked above; anything else not used is a config/weights mismatch.
  unexpected = sorted(k for k in available - used if not k.startswith(_PREFIX))
  if missing or mismatched or unexpected:
    lines = [f"{source} does not match the CLIPModel built from its config.json:"]
    for title, items in (
      ("missing", missing),
      ("shape mismatch", mismatched),
      ("unexpected", unexpected),
    ):
      lines += [f"  {title} ({len(items)}):", *(f"    {item}" for item in items)] if items else []
    raise ValueError("\n".join(lines))
  params = traverse_util.unflatten_dict(flat_params)
  params["text_model"] = text
  return params


def load_clip_model(
  path: str,
  *,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  mesh: Mesh | None = None,
  logical_axis_rules=None,
) -> tuple[CLIPModel, Mapping]:
  """Builds a two-tower `CLIPModel` from `path/config.json` and loads its safetensors.

  `path` is a local copy of a Hugging Face CLIPModel repo, e.g. for the paper's CLIP score
  `huggingface-cli download laion/CLIP-ViT-g-14-laion2B-s12B-b42K --local-dir /data/clip-vit-g-14`
  (config.json, model.safetensors or its sharded index, and the tokenizer files). Returns
  `(model, params)` with plain params as `load_clip_text_encoder` does, sharded by their logical
  axes when `mesh` is given. Raises one ValueError naming the file and every bad key.
  """
  path = os.fspath(path)
  config = read_hf_config(path)
  if not isinstance(config.get("vision_config"), Mapping):
    raise ValueError(
      f"{os.path.join(path, 'config.json')} has no vision_config: a full CLIPModel directory "
      "is needed for CLIP score, not a text encoder's"
    )
  model = CLIPModel.from_hf_config(config, dtype=dtype, param_dtype=param_dtype)
  reader = _SafetensorsReader(path)
  params = convert_clip_model(reader, model, reader.description)
  if mesh is None:
    return model, jax.device_put(params)
  shardings = sharding.logical_to_shardings(
    abstract_clip_params(model), mesh, sharding.logical_axis_rules(logical_axis_rules)
  )
  return model, _place(params, shardings)

"""CLIP text encoder: parity with transformers' PyTorch CLIP, checkpoint errors, sharding, bf16.

Most tests write tiny Hugging Face-format checkpoints with numpy, so they run without torch; the
parity tests need torch (not a project requirement) and skip without it.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

from md_jax.infra import sharding
from md_jax.models import clip_weights
from md_jax.models.clip_weights import abstract_params, load_clip_text_encoder
from md_jax.models.text_encoder import CLIPTextEncoder

TINY = dict(
  vocab_size=1000,
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  bos_token_id=0,
  pad_token_id=1,
  eos_token_id=2,
)


def _hf_text_state(config: dict, rng: np.random.Generator, prefix: str = "") -> dict:
  """Random tensors under CLIPTextModel's key names, written out independently of the loader."""
  e, m = config["hidden_size"], config["intermediate_size"]
  shapes = {
    "embeddings.token_embedding.weight": (config["vocab_size"], e),
    "embeddings.position_embedding.weight": (config["max_position_embeddings"], e),
    "final_layer_norm.weight": (e,),
    "final_layer_norm.bias": (e,),
  }
  for i in range(config["num_hidden_layers"]):
    layer = f"encoder.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes[f"{layer}self_attn.{proj}.weight"] = (e, e)
      shapes[f"{layer}self_attn.{proj}.bias"] = (e,)
    for norm in ("layer_norm1", "layer_norm2"):
      shapes[f"{layer}{norm}.weight"] = (e,)
      shapes[f"{layer}{norm}.bias"] = (e,)
    shapes[f"{layer}mlp.fc1.weight"] = (m, e)
    shapes[f"{layer}mlp.fc1.bias"] = (m,)
    shapes[f"{layer}mlp.fc2.weight"] = (e, m)
    shapes[f"{layer}mlp.fc2.bias"] = (e,)
  state = {}
  for key, shape in shapes.items():
    scale = 1 / np.sqrt(shape[-1]) if len(shape) == 2 and "embeddings" not in key else 0.2
    value = rng.normal(0, scale, shape)
    if "norm" in key and key.endswith(".weight"):
      value += 1
    state[prefix + key] = value.astype(np.float32)
  return state


def _write_checkpoint(path, config: dict, state: dict):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config))
  save_file(state, str(path / "model.safetensors"))
  return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  config = dict(TINY, architectures=["CLIPTextModel"], model_type="clip_text_model")
  state = _hf_text_state(config, np.random.default_rng(0))
  return _write_checkpoint(tmp_path_factory.mktemp("clip_tiny"), config, state)


def _token_ids(batch: int, eos_id: int, seed: int = 0, high: int = 998) -> np.ndarray:
  """Random prompts ending in EOS at varied positions, padded after it like the CLIP tokenizer."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, high, size=(batch, 77))
  ids[ids == eos_id] += 1  # The only EOS is the one placed below.
  ids[:, 0] = 0  # BOS
  lengths = np.linspace(2, 76, batch).astype(int)
  for b, eos_pos in enumerate(lengths):
    ids[b, eos_pos] = eos_id
    ids[b, eos_pos + 1 :] = 1
  return ids.astype(np.int32), lengths


def _apply(module, params, ids, attention_mask=None):
  with jax.default_matmul_precision("float32"):
    return jax.jit(module.apply)({"params": params}, jnp.asarray(ids), attention_mask)


# --- parity with transformers (PyTorch) ----------------------------------------------------------


def _randomize(model, torch):
  # HF initialises LayerNorms to identity and biases to zero, which would hide a swapped or
  # dropped scale/bias in the converter; random values make every tensor matter.
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = p.shape[-1] ** -0.5 if p.ndim == 2 and "embedding" not in name else 0.2
      offset = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
      p.copy_(torch.randn(p.shape, generator=gen) * scale + offset)


@pytest.mark.parametrize(
  "eos_token_id",
  [
    2,  # original openai configs: pooled at argmax(input_ids)
    500,  # fixed configs: pooled at the first eos_token_id, even with larger ids around it
  ],
)
def test_parity_with_transformers(tmp_path, eos_token_id):
  torch = pytest.importorskip("torch", reason="parity reference needs PyTorch transformers CLIP")
  config = transformers.CLIPTextConfig(**dict(TINY, eos_token_id=eos_token_id))
  torch.manual_seed(0)
  reference = transformers.CLIPTextModel(config).eval()
  _randomize(reference, torch)
  reference.save_pretrained(tmp_path)  # transformers 5 writes safetensors without `text_model.`.

  module, params = load_clip_text_encoder(tmp_path)
  assert module.eos_token_id == eos_token_id
  # With eos 2 the pooled token is the largest id, which the tokenizer guarantees for real EOS.
  eos_id = 999 if eos_token_id == 2 else eos_token_id
  ids, lengths = _token_ids(6, eos_id)
  # Right padding hides keys past each prompt, as a tokenizer's attention_mask would.
  mask = (np.arange(77)[None] <= lengths[:, None]).astype(np.int32)
  for attention_mask in (None, mask):
    with torch.no_grad():
      ref = reference(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
      )
    out = _apply(module, params, ids, attention_mask)
    hidden_diff = np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max()
    pooled_diff = np.abs(np.asarray(out.pooled_output) - ref.pooler_output.numpy()).max()
    assert hidden_diff <= 1e-5 and pooled_diff <= 1e-5, (hidden_diff, pooled_diff)
  # The EOS rows of the hidden states, up to rounding: XLA may compute the gathered rows in a
  # fusion of their own (another token's row differs by O(1)).
  np.testing.assert_allclose(
    np.asarray(out.pooled_output),
    np.asarray(out.last_hidden_state)[np.arange(6), lengths],
    rtol=0,
    atol=1e-6,
  )


def test_loads_bfloat16_checkpoint(tmp_path):
  # safetensors' numpy backend cannot read BF16 tensors; the loader reads them itself.
  torch = pytest.importorskip("torch", reason="writing a bf16 checkpoint needs PyTorch")
  reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY))
  reference.to(torch.bfloat16).save_pretrained(tmp_path)
  _, params = load_clip_text_encoder(tmp_path)
  q_weight = reference.encoder.layers[1].self_attn.q_proj.weight.float().detach().numpy()
  kernel = np.asarray(params["layers_1"]["self_attn"]["q_proj"]["kernel"])
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, q_weight.T)


# --- checkpoint formats and errors (numpy-written checkpoints) -----------------------------------


def test_clip_model_checkpoint_with_prefix_and_vision_tower(tmp_path, tiny_checkpoint):
  text_config = json.loads((tiny_checkpoint / "config.json").read_text())
  state = {
    f"text_model.{k}": v for k, v in load_file(tiny_checkpoint / "model.safetensors").items()
  }
  state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  state["vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3, 4, 4), np.float32)
  state["vision_model.post_layernorm.weight"] = np.ones((8,), np.float32)
  state["text_projection.weight"] = np.zeros((16, 64), np.float32)
  state["logit_scale"] = np.zeros((), np.float32)
  config = {"architectures": ["CLIPModel"], "text_config": text_config, "vision_config": {}}
  clip_dir = _write_checkpoint(tmp_path / "clip", config, state)

  module, params = load_clip_text_encoder(clip_dir)
  ref_module, ref_params = load_clip_text_encoder(tiny_checkpoint)
  assert module == ref_module
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def test_missing_key_raises_one_error_naming_it(tmp_path, tiny_checkpoint):
  state = load_file(tiny_checkpoint / "model.safetensors")
  del state["encoder.layers.1.mlp.fc2.bias"]
  del state["final_layer_norm.weight"]
  state["encoder.layers.2.mlp.fc1.weight"] = np.zeros((128, 64), np.float32)
  path = _write_checkpoint(
    tmp_path / "ckpt", json.loads((tiny_checkpoint / "config.json").read_text()), state
  )
  with pytest.raises(ValueError) as error:
    load_clip_text_encoder(path)
  message = str(error.value)
  assert str(path / "model.safetensors") in message
  assert "encoder.layers.1.mlp.fc2.bias" in message
  assert "final_layer_norm.weight" in message
  assert "unexpected (1)" in message and "encoder.layers.2.mlp.fc1.weight" in message


def test_mismatched_shape_names_key_and_both_shapes(tmp_path, tiny_checkpoint):
  state = load_file(tiny_checkpoint / "model.safetensors")
  state["encoder.layers.0.mlp.fc1.weight"] = np.zeros((96, 64), np.float32)
  path = _write_checkpoint(
    tmp_path / "ckpt", json.loads((tiny_checkpoint / "config.json").read_text()), state
  )
  with pytest.raises(ValueError, match=r"model\.safetensors") as error:
    load_clip_text_encoder(path)
  line = next(ln for ln in str(error.value).splitlines() if "mlp.fc1.weight" in ln)
  assert "encoder.layers.0.mlp.fc1.weight" in line
  assert "(96, 64)" in line and "(128, 64)" in line


def test_missing_directory_files_raise_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    load_clip_text_encoder(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    load_clip_text_encoder(tmp_path)


# --- module properties ---------------------------------------------------------------------------


def test_bfloat16_compute_stays_close(tiny_checkpoint):
  module, params = load_clip_text_encoder(tiny_checkpoint)
  bf16_module, bf16_params = load_clip_text_encoder(
    tiny_checkpoint, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
  )
  ids, _ = _token_ids(4, 999)
  ref = _apply(module, params, ids)
  out = _apply(bf16_module, bf16_params, ids)
  assert out.last_hidden_state.dtype == jnp.bfloat16
  assert bf16_params["layers_0"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
  # Activations after the final LayerNorm are O(1); bf16 keeps ~3 significant digits.
  diff = np.abs(np.asarray(out.last_hidden_state, np.float32) - np.asarray(ref.last_hidden_state))
  assert diff.mean() < 0.02 and diff.max() < 0.25, (diff.mean(), diff.max())


def test_every_param_is_logically_partitioned():
  module = CLIPTextEncoder.from_hf_config(TINY)
  vocabulary = {name for name, _ in sharding.DEFAULT_LOGICAL_AXIS_RULES}
  leaves = jax.tree.leaves(
    abstract_params(module), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert len(leaves) == 4 + 16 * TINY["num_hidden_layers"]
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= vocabulary, leaf.names


def test_init_directly_sharded_under_mesh():
  # The trainers' pattern: eval_shape -> shardings -> jit(init, out_shardings) with the mesh and
  # rules active (flax then constrains each param at creation, which must match its rank).
  module = CLIPTextEncoder.from_hf_config(TINY)
  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  shardings = clip_weights.param_shardings(module, mesh, rules)
  init = lambda rng: nn.meta.unbox(module.init(rng, jnp.zeros((8, 77), jnp.int32))["params"])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  q_kernel = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert q_kernel.sharding.spec == PartitionSpec("fsdp", None)
  assert params["token_embedding"]["embedding"].sharding.spec == PartitionSpec(None, "fsdp")


def test_sharded_load_matches_unsharded(tiny_checkpoint):
  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  module, params = load_clip_text_encoder(tiny_checkpoint)
  _, sharded = load_clip_text_encoder(tiny_checkpoint, mesh=mesh, logical_axis_rules=rules)
  fc1 = sharded["layers_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == PartitionSpec("fsdp", None)  # ("embed", "mlp") under FSDP.
  ids, _ = _token_ids(8, 999)
  ref = _apply(module, params, ids)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = _apply(module, sharded, jax.device_put(ids, sharding.batch_sharding(mesh, rules, 2)))
  np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
  np.testing.assert_allclose(out.pooled_output, ref.pooled_output, atol=1e-5)


def test_config_sources_and_vit_l14_size():
  from_object = CLIPTextEncoder.from_hf_config(transformers.CLIPTextConfig(**TINY))
  assert from_object == CLIPTextEncoder.from_hf_config(TINY)
  # A config.json that omits keys means transformers' defaults, not the module's ViT-L defaults.
  assert CLIPTextEncoder.from_hf_config({}).hidden_size == 512
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextEncoder.from_hf_config(dict(TINY, hidden_act="relu6"))
  # openai/clip-vit-large-patch14's text tower has 123,060,480 parameters.
  shapes = nn.meta.unbox(abstract_params(CLIPTextEncoder()))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 123_060_480
  assert clip_weights._hf_key(("layers_11", "self_attn", "out_proj", "kernel")) == (
    "encoder.layers.11.self_attn.out_proj.weight"
  )


def _clip_directory(path, vocab_size: int):
  """A CLIP text-encoder directory (config.json, model.safetensors) with the shipped `shapes`
  vocabulary beside it, as a real CLIP directory carries its own."""
  import shutil

  from md_jax.data import tokenizer

  words = tokenizer.load_tokenizer()
  config = dict(TINY, vocab_size=vocab_size, eos_token_id=words.eos_token_id)
  _write_checkpoint(path, config, _hf_text_state(config, np.random.default_rng(0)))
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(tokenizer.SHAPES_TOKENIZER_DIR / name, path / name)
  return path


def test_a_run_on_clip_weights_reads_their_vocabulary_and_a_mismatch_is_named(tmp_path):
  import pathlib

  from md_jax import config_utils
  from md_jax.data import tokenizer
  from md_jax.pipeline.text_to_image import TextToImage
  from md_jax.training import preflight

  repo = pathlib.Path(__file__).parents[1]
  config = config_utils.load_config(repo / "configs/diffusion.py:tiny")
  vocabulary = len(tokenizer.load_tokenizer())
  config.text_encoder.path = str(_clip_directory(tmp_path / "clip", vocabulary))
  assert config.model.text_dim == TINY["hidden_size"]

  assert tokenizer.tokenizer_dir_of(config) == (
    config.text_encoder.path,
    "config.text_encoder.path",
  )
  preflight.check_text_encoder(config)
  pipeline = TextToImage.from_config(config)
  assert pipeline.tokenizer.name_or_path == config.text_encoder.path
  assert pipeline.text_encoder.vocab_size == vocabulary

  other = config.copy_and_resolve_references()
  other.text_encoder.path = str(_clip_directory(tmp_path / "other", vocabulary + 387))
  expected = rf"vocabulary of {vocabulary} tokens, but the text encoder at config.text_encoder.path"
  with pytest.raises(ValueError, match=rf"{expected}='.*other' embeds {vocabulary + 387}"):
    preflight.check_text_encoder(other)
  other.data.tokenizer_dir = str(tokenizer.SHAPES_TOKENIZER_DIR)  # named: it wins, and is named
  assert tokenizer.tokenizer_dir_of(other)[1] == "config.data.tokenizer_dir"
  with pytest.raises(ValueError, match=r"config.data.tokenizer_dir=.* holds a vocabulary"):
    preflight.check_text_encoder(other)

  wider = config.copy_and_resolve_references()
  wider.model.text_dim = 96
  with pytest.raises(ValueError, match=r"config.model.text_dim=96, but .* is 64 wide"):
    preflight.check_text_encoder(wider)

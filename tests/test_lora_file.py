"""LoRA files (issue 42): the safetensors file round-trips bitwise, several LoRAs merge with their
scales as W0 + Σ s·(α/r)·A·B, a LoRA applies to any UNet of its layout, and a bad file or layout
is one error naming the culprit."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from md_jax import config_utils
from md_jax.models import lora
from md_jax.models.unet import UNet
from md_jax.pipeline import lora_file
from md_jax.pipeline.checkpoint_layout import InferenceParams

REPO = pathlib.Path(__file__).parents[1]
ATTENTION = ("attn", "proj_in", "proj_out")  # DreamBooth-LoRA's targets: attention, projections


def select(*words):
  return lambda path, leaf: lora.is_kernel(path, leaf) and any(w in "/".join(path) for w in words)


def trained_factors(params, rank: int, seed: int, words=ATTENTION, std: float = 0.05):
  """LoRA factors as after training: `init_lora`'s, with B drawn too (it starts at zero)."""
  factors = lora.init_lora(params, rank, jax.random.key(seed), select=select(*words))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    return rng.normal(0, std, x.shape).astype(np.float32) if name == "lora_b" else np.asarray(x)

  return jax.tree_util.tree_map_with_path(fill, factors)


@pytest.fixture(scope="module")
def unets():
  """Two tiny UNets of one layout (`configs/models/tiny.py`), different random weights."""
  unet = UNet.from_config(config_utils.load_config(REPO / "configs/models/tiny.py"))
  x, t, text = jnp.zeros((1, 8, 8, 8)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 64))
  init = jax.jit(lambda key: nn.meta.unbox(unet.init(key, x, t, text)["params"]))
  return [jax.tree.map(np.asarray, jax.device_get(init(jax.random.key(s)))) for s in (0, 1)]


def flat(tree):
  return lora_file._flat(tree)


def one_line_error(match, call):
  with pytest.raises(ValueError, match=match) as info:
    call()
  assert "\n" not in str(info.value)
  return str(info.value)


def test_save_then_load_is_bitwise_and_the_manifest_describes_the_base(unets, tmp_path):
  params = unets[0]
  factors = trained_factors(params, rank=3, seed=0)
  path = tmp_path / "concept.safetensors"
  lora_file.save_lora(path, factors, rank=3, alpha=6.0, base_params=params, info={"token": "sks"})
  loaded, manifest = lora_file.load_lora(path)
  saved = flat(factors)
  assert set(flat(loaded)) == set(saved) and len(saved) > 10
  for key, value in flat(loaded).items():
    assert value.dtype == saved[key].dtype
    np.testing.assert_array_equal(value, saved[key])
  assert manifest["rank"] == 3 and manifest["alpha"] == 6.0 and manifest["info"] == {"token": "sks"}
  assert manifest["targets"] == sorted(k.rsplit("/", 1)[0] for k in saved if k.endswith("lora_a"))
  assert all(any(w in t for w in ATTENTION) for t in manifest["targets"])
  assert manifest["base_layout_sha256"] == lora_file.layout_hash(params)
  assert manifest["base_weights_sha256"] == lora_file.weights_hash(params)
  # The layout hash is of shapes and dtypes only; the weights hash sees the weights.
  assert lora_file.layout_hash(unets[1]) == lora_file.layout_hash(params)
  assert lora_file.weights_hash(unets[1]) != lora_file.weights_hash(params)
  # A plain safetensors file: another reader gets the tensors and the JSON manifest.
  assert set(safetensors.numpy.load_file(str(path))) == set(saved)
  assert path.stat().st_size < sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)) / 4


def test_two_loras_with_scales_merge_as_an_independent_numpy_sum(unets, tmp_path):
  params = unets[0]
  # Overlapping targets (the transformers' projections), 2-D, 3-D (attention) and 4-D (conv)
  # kernels, different ranks and alphas.
  first = trained_factors(params, rank=2, seed=1, words=("attn", "proj_in"))
  second = trained_factors(params, rank=3, seed=2, words=("proj_in", "proj_out", "conv_0"))
  a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
  lora_file.save_lora(a, first, rank=2, alpha=4.0, base_params=params)
  lora_file.save_lora(b, second, rank=3, alpha=1.5, base_params=params)
  merged = lora_file.apply_loras(params, [(str(a), 0.7), (b, -1.3)])

  expected = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
  for factors, scale, alpha, rank in ((first, 0.7, 4.0, 2), (second, -1.3, 1.5, 3)):
    for key, value in flat(factors).items():
      if key.endswith("lora_a"):
        kernel = key.rsplit("/", 1)[0]
        low = np.asarray(value, np.float64) @ np.asarray(flat(factors)[f"{kernel}/lora_b"])
        expected[kernel] += scale * alpha / rank * low.reshape(expected[kernel].shape)
  touched = {k.rsplit("/", 1)[0] for k in [*flat(first), *flat(second)]}
  assert any(np.ndim(flat(params)[k]) == 4 for k in touched)
  assert any(np.ndim(flat(params)[k]) == 3 for k in touched)
  for key, value in flat(merged).items():
    assert value.dtype == flat(params)[key].dtype
    if key in touched:
      np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
      assert not np.array_equal(value, flat(params)[key]), key
    else:
      np.testing.assert_array_equal(value, flat(params)[key], err_msg=key)
  # One LoRA at scale 1 is UFOGen's merge: W0 + (α/r)·A·B.
  jax.tree.map(
    np.testing.assert_array_equal,
    lora_file.apply_loras(params, [(a, 1.0)]),
    jax.device_get(lora.merge(params, first, 4.0, 2)),
  )


def test_a_lora_applies_to_another_unet_of_its_layout(unets, tmp_path):
  base, other = unets
  factors = trained_factors(base, rank=2, seed=3)
  path = tmp_path / "style.safetensors"
  lora_file.save_lora(path, factors, rank=2, alpha=2.0, base_params=base)
  merged = lora_file.apply_loras(other, [(path, 0.5)])
  kernel = "innermost/mid_transformer/layer_0/self_attn/query/kernel"
  low = flat(factors)[f"{kernel}/lora_a"] @ flat(factors)[f"{kernel}/lora_b"]
  np.testing.assert_allclose(
    flat(merged)[kernel], flat(other)[kernel] + 0.5 * low.reshape(64, 4, 16), rtol=1e-6, atol=1e-7
  )
  np.testing.assert_array_equal(flat(merged)["conv_in/kernel"], flat(other)["conv_in/kernel"])


def test_a_lora_made_for_another_layout_is_one_error_naming_file_and_path(unets, tmp_path):
  base = unets[0]
  path = tmp_path / "concept.safetensors"
  lora_file.save_lora(path, trained_factors(base, 2, 4), rank=2, alpha=2.0, base_params=base)
  wider = jax.tree.map(lambda x: x, base)
  wider["innermost"]["mid_transformer"]["proj_in"]["kernel"] = np.zeros((64, 80), np.float32)
  message = one_line_error(
    "was made for another UNet layout", lambda: lora_file.apply_loras(wider, [(path, 1.0)])
  )
  assert str(path) in message
  assert message.endswith(
    "innermost/mid_transformer/proj_in/kernel is (64, 80) float32 here, (64, 64) float32 in the "
    "LoRA's base"
  )
  # The first difference in path order is named, a missing leaf too; so is a dtype.
  fewer = jax.tree.map(lambda x: x, base)
  del fewer["conv_in"]["bias"]
  message = one_line_error("another UNet layout", lambda: lora_file.apply_loras(fewer, [(path, 1)]))
  assert "conv_in/bias (32,) float32 is not in this UNet" in message
  half = jax.tree.map(lambda x: x.astype(np.float16), base)
  one_line_error(r"conv_in/bias is \(32,\) float16 here, \(32,\) float32 in the LoRA's base",
                 lambda: lora_file.apply_loras(half, [(path, 1.0)]))  # fmt: skip


def test_bad_files_are_one_line_errors_naming_the_file_and_key(unets, tmp_path):
  base = unets[0]
  good = tmp_path / "good.safetensors"
  lora_file.save_lora(good, trained_factors(base, 2, 5), rank=2, alpha=2.0, base_params=base)
  tensors = safetensors.numpy.load_file(str(good))
  manifest = json.loads(lora_file._header(good.read_bytes(), "")["__metadata__"]["md_jax_lora"])
  key = "innermost/mid_transformer/proj_out/kernel/lora_b"
  assert key in tensors

  def write(name, tensors, metadata=None):
    path = tmp_path / name
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return path

  metadata = {"md_jax_lora": json.dumps(manifest)}
  missing = write("missing.safetensors", {k: v for k, v in tensors.items() if k != key}, metadata)
  assert f"'{missing}': missing key '{key}'" in one_line_error(
    "missing key", lambda: lora_file.load_lora(missing)
  )
  reshaped = write("shape.safetensors", {**tensors, key: np.zeros((3, 64), np.float32)}, metadata)
  assert f"key '{key}' is (3, 64); rank 2 on the base's (64, 64) kernel needs (2, 64)" in (
    one_line_error(str(reshaped), lambda: lora_file.load_lora(reshaped))
  )
  plain = write("plain.safetensors", tensors)
  one_line_error(
    f"'{plain}': not an md_jax LoRA file \\(no 'md_jax_lora'", lambda: lora_file.load_lora(plain)
  )
  no_rank = {k: v for k, v in manifest.items() if k != "rank"}
  no_rank = write("no_rank.safetensors", tensors, {"md_jax_lora": json.dumps(no_rank)})
  one_line_error("its manifest has no key 'rank'", lambda: lora_file.load_lora(no_rank))
  noise = tmp_path / "noise.safetensors"
  noise.write_bytes(np.random.default_rng(0).bytes(300))
  one_line_error(f"'{noise}': not a safetensors file", lambda: lora_file.load_lora(noise))
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(good.read_bytes()[:-100])
  one_line_error(f"'{truncated}': its tensors do not load", lambda: lora_file.load_lora(truncated))
  one_line_error(
    "'nowhere.safetensors' does not exist", lambda: lora_file.load_lora("nowhere.safetensors")
  )
  # Saving checks too: factors that do not fit the base named by key.
  factors = trained_factors(base, 2, 6)
  one_line_error(
    r"key '.*/lora_a' is \(\d+, 2\); rank 3",
    lambda: lora_file.save_lora(tmp_path / "x.safetensors", factors, rank=3, alpha=1.0,
                                base_params=base),
  )  # fmt: skip


def test_a_files_token_rows_are_set_in_the_text_encoder_and_only_there(unets, tmp_path):
  """Pivotal tuning: a file's token rows replace those rows of the text encoder's table (the
  scale weights the factors only); other rows, and the UNet merge, are as without them."""
  rng = np.random.default_rng(0)
  text_encoder = {"token_embedding": {"embedding": rng.normal(size=(20, 4)).astype(np.float32)},
                  "final_layer_norm": {"scale": np.ones(4, np.float32)}}  # fmt: skip
  factors = trained_factors(unets[0], rank=2, seed=3)
  rows = rng.normal(size=(3, 4)).astype(np.float32)
  token = {"ids": [5, 7, 11], "rows": rows, "table_shape": [20, 4]}
  path = tmp_path / "pivotal.safetensors"
  lora_file.save_lora(path, factors, rank=2, alpha=2.0, base_params=unets[0], token_embedding=token)
  loaded = lora_file.load_lora(path)
  assert loaded[1]["token_embedding"] == {"ids": [5, 7, 11], "table_shape": [20, 4]}
  params = InferenceParams(unet=unets[1], text_encoder=text_encoder, autoencoder={})
  table = text_encoder["token_embedding"]["embedding"]
  original = table.copy()
  applied = lora_file.apply_to(params, [(path, 0.5)])
  expected = original.copy()
  expected[[5, 7, 11]] = rows
  np.testing.assert_array_equal(applied.text_encoder["token_embedding"]["embedding"], expected)
  np.testing.assert_array_equal(table, original)  # the caller's table is not written to
  jax.tree.map(
    np.testing.assert_array_equal, applied.unet, lora_file.apply_loras(unets[1], [(path, 0.5)])
  )
  # Two files setting one token id, a table of another shape, rows without their ids: one error.
  other = tmp_path / "other.safetensors"
  lora_file.save_lora(other, factors, rank=2, alpha=2.0, base_params=unets[0],
                      token_embedding={**token, "ids": [1, 2, 7]})  # fmt: skip
  one_line_error(
    r"LoRA files '.*pivotal.safetensors' and '.*other.safetensors' both set token 7",
    lambda: lora_file.apply_to(params, [(path, 1.0), (other, 1.0)]),
  )
  small = params.replace(text_encoder={"token_embedding": {"embedding": table[:12]}})
  one_line_error(r"sets rows of a \[20, 4\] token table; this text encoder's is \[12, 4\]",
                 lambda: lora_file.apply_to(small, [(path, 1.0)]))  # fmt: skip
  data = path.read_bytes()
  header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
  manifest = json.loads(header["__metadata__"][lora_file.MANIFEST_KEY])
  tensors = safetensors.numpy.load(data)
  del manifest["token_embedding"]
  bad = tmp_path / "bad.safetensors"
  safetensors.numpy.save_file(
    tensors, str(bad), metadata={lora_file.MANIFEST_KEY: json.dumps(manifest)}
  )
  one_line_error(r"holds token rows without their ids \(no key 'token_embedding'\)",
                 lambda: lora_file.load_lora(bad))  # fmt: skip

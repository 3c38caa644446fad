"""UNet: resolution-independent params, attention switches, null text, counts, sharding, bf16.

Full-size models (MD 388M, SD-1.5 860M) are only traced with `jax.eval_shape` / lowered for cost
analysis, never compiled or allocated; everything that runs uses the tiny config.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.config_utils import load_config
from md_jax.infra import sharding
from md_jax.models import attention as attention_lib
from md_jax.models import cpu_lowering
from md_jax.models.transformer import SpatialTransformer
from md_jax.models.unet import UNet, null_text_embedding
from md_jax.tools import model_stats
from md_jax.tools.model_stats import layout_counts

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"


def _config(name):
  return load_config(CONFIGS / name)


def _inputs(unet, batch=2, size=8, seed=0):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, unet.in_channels))
  t = jax.random.uniform(kt, (batch,), maxval=1000.0)
  text = jax.random.normal(kc, (batch, unet.text_length, unet.text_dim))
  return x, t, text


# Compiling flax init (hundreds of random initialisers) dominates CPU test time, so the tests that
# only need *some* params draw them on the host from the eval_shape'd structure; the real jitted
# init runs once, sharded, in test_tiny_sharded_init.
def _random_params(unet, size=8, seed=0):
  shapes = jax.eval_shape(unet.init, jax.random.key(0), *_inputs(unet, size=size))
  return _host_random(shapes, seed)["params"]


def _host_random(shapes, seed=0):
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if "scale" in name:
      return 1.0 + 0.1 * noise
    if "kernel" in name:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 0.1 * noise  # biases, null text embedding

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


@functools.cache
def _apply(unet):
  """Jitted apply; modules hash by their fields, so equal clones share the compiled function."""
  return jax.jit(lambda p, *a, **kw: unet.apply({"params": p}, *a, **kw))


@pytest.fixture(scope="module")
def tiny():
  return UNet.from_config(_config("tiny.py"))


@pytest.fixture(scope="module")
def tiny_params(tiny):
  return _random_params(tiny)


@functools.cache
def _abstract(config_name):
  unet = UNet.from_config(_config(config_name))
  return unet, model_stats.abstract_params(unet, latent_size=2 ** (len(unet.channels) - 1))


def test_same_params_at_two_resolutions(tiny, tiny_params):
  """Progressive training: params initialised at an 8×8 latent apply unchanged at 16×16."""
  at_16 = jax.eval_shape(tiny.init, jax.random.key(0), *_inputs(tiny, size=16))["params"]
  assert jax.tree.map(lambda a: a.shape, nn.meta.unbox(at_16)) == jax.tree.map(
    jnp.shape, tiny_params
  )
  out8 = _apply(tiny)(tiny_params, *_inputs(tiny, size=8))
  out16 = _apply(tiny)(tiny_params, *_inputs(tiny, size=16))
  assert out8.shape == (2, 8, 8, 8) and out16.shape == (2, 16, 16, 8)
  assert np.isfinite(out16).all() and float(jnp.std(out16)) > 1e-3


def test_pixel_space_variant_shapes():
  unet = UNet.from_config(_config("tiny.py:pixels"))
  inputs = _inputs(unet, batch=1, size=32)
  out = jax.eval_shape(lambda p: unet.apply({"params": p}, *inputs), _random_params(unet, 32))
  assert out.shape == (1, 32, 32, 3)


def test_relu_attention_formula():
  q, k, v = (jax.random.normal(jax.random.key(i), (1, 5, 2, 4)) for i in range(3))
  k, v = k[:, :3], v[:, :3]  # 3 keys, so the 1/N normaliser is 1/3, not 1/5
  out = attention_lib.dot_product_attention(q, k, v, "relu")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0  # sqrt(head_dim = 4)
  expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.relu(logits) / 3, v)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="attention_fn"):
    attention_lib.dot_product_attention(q, k, v, "sigmoid")


def test_fused_attention_padding_equals_the_einsum_attention():
  """The cudnn path pads 77 text keys to 128 and masks them by length: run through jax's XLA
  implementation, values and q/k/v gradients equal the einsum attention's: the padding leaks
  nothing."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 16, 3, 8))
  k, v = (jax.random.normal(key, (2, 77, 3, 8)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)

  def outputs(attend):
    out, vjp = jax.vjp(attend, q, k, v)
    return [out, *vjp(cotangent)]

  fused = outputs(
    lambda *a: attention_lib.fused_softmax_attention(*a, scale=8**-0.5, implementation="xla")
  )
  einsum = outputs(lambda *a: attention_lib.dot_product_attention(*a, "softmax"))
  for got, want in zip(fused, einsum):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_implementation_is_validated(tiny, tiny_params):
  inputs = _inputs(tiny)
  with pytest.raises(ValueError, match="attention implementation.*'flash'"):
    _apply(tiny.clone(attention_implementation="flash"))(tiny_params, *inputs)
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="cudnn attention implementation is softmax only"):
    attention_lib.dot_product_attention(q, q, q, "relu", implementation="cudnn")


def test_relu_and_softmax_attention_both_run_and_differ(tiny, tiny_params):
  inputs = _inputs(tiny)
  soft = _apply(tiny)(tiny_params, *inputs)
  relu = _apply(tiny.clone(attention_fn="relu"))(tiny_params, *inputs)
  assert np.isfinite(soft).all() and np.isfinite(relu).all()
  assert float(jnp.max(jnp.abs(soft - relu))) > 1e-3


def _attention_modules(params):
  """(path, param dict) of every Attention module in a param tree."""
  found = []

  def visit(node, path):
    if not isinstance(node, dict):
      return
    if "query" in node:
      found.append((path, node))
      return
    for key, child in node.items():
      visit(child, (*path, key))

  visit(params, ())
  return found


def test_pooled_text_conditions_a_unet_without_cross_attention(tiny):
  """`pooled_text`: with every transformer removed, the caption reaches the output only through
  the pooled embedding added to the time vector, and only when the option is on."""
  no_attention = tiny.clone(
    down_transformer_depths=((0,), (0,)),
    up_transformer_depths=((0, 0), (0, 0)),
    mid_transformer_depth=0,
    learned_null_text=False,
  )
  x, t, text = _inputs(no_attention)
  other_text = text[::-1]
  for pooled in (False, True):
    unet = no_attention.clone(pooled_text=pooled)
    params = _random_params(unet)
    assert ("pooled_text_proj" in params) == pooled
    a, b = (_apply(unet)(params, x, t, emb) for emb in (text, other_text))
    assert (float(jnp.max(jnp.abs(a - b))) > 1e-3) == pooled


def test_shared_kv_is_one_parameter(tiny, tiny_params):
  modules = _attention_modules(tiny_params)
  self_attn = [m for path, m in modules if path[-1] == "self_attn"]
  cross_attn = [m for path, m in modules if path[-1] == "cross_attn"]
  assert len(self_attn) == layout_counts(tiny)["num_sa"] == 2
  assert len(cross_attn) == layout_counts(tiny)["num_ca"] == 4
  for m in self_attn:
    assert set(m) == {"query", "key_value", "out"}
  for m in cross_attn:  # cross-attention projects text: K and V stay separate
    assert set(m) == {"query", "key", "value", "out"}
  # Without sharing, each SA layer gains exactly one d×d kernel (the second of K, V).
  unshared = tiny.clone(shared_kv=False)
  extra = model_stats.param_count(unshared) - model_stats.param_count(tiny)
  assert extra == sum(int(m["key_value"]["kernel"].size) for m in self_attn)


def test_null_text_path(tiny, tiny_params):
  null = null_text_embedding(tiny_params)
  assert null.shape == (tiny.text_length, tiny.text_dim)
  x, t, text = _inputs(tiny)

  @jax.jit
  def outputs(p):
    apply = lambda *a, **kw: tiny.apply({"params": p}, x, t, *a, **kw)
    return (
      apply(text),
      apply(None),
      apply(null_text_embedding(p, 2)),
      apply(text, drop_text=jnp.array([False, True])),
    )

  cond, uncond, explicit_null, mixed = outputs(tiny_params)
  np.testing.assert_allclose(uncond, explicit_null, atol=1e-6)
  assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3
  np.testing.assert_allclose(mixed[0], cond[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], uncond[1], atol=1e-5)

  no_null = tiny.clone(learned_null_text=False)
  with pytest.raises(ValueError, match="learned_null_text"):
    jax.eval_shape(no_null.init, jax.random.key(0), x, t, None)


def test_layout_validation(tiny):
  bad = tiny.clone(up_transformer_depths=((0,), (1, 1)), up_self_attention=((False,), (True, True)))
  with pytest.raises(ValueError, match="one block more"):
    jax.eval_shape(bad.init, jax.random.key(0), *_inputs(bad))
  with pytest.raises(TypeError):
    UNet.from_config({**_config("tiny.py").to_dict(), "chanels": (32, 64)})


def test_md_and_sd15_param_counts_and_layout():
  md, md_params = _abstract("mobilediffusion.py")
  sd, sd_params = _abstract("sd15.py")
  md_count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(md_params)))
  sd_count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(sd_params)))
  assert abs(md_count / 386e6 - 1) < 0.03, md_count
  assert abs(sd_count / 859.52e6 - 1) < 0.005, sd_count
  assert sd_count == 859_520_964  # diffusers' SD-1.5 UNet, parameter for parameter
  assert layout_counts(md) == {
    "channels": (320, 640, 1024),
    "num_conv_blocks": 11,
    "num_sa": 15,
    "num_ca": 18,
  }
  assert layout_counts(sd) == {
    "channels": (320, 640, 1280, 1280),
    "num_conv_blocks": 22,
    "num_sa": 16,
    "num_ca": 16,
  }
  # The counts come from the config; check them against the modules actually built.
  assert len(_attention_modules(md_params)) == 18 + 15
  assert sum("key_value" in m for _, m in _attention_modules(md_params)) == 15


def test_gflops_match_table1():
  """Multiply-add convention: SD-1.5 ~392 and MD ~182 GFLOPs at a 64×64 latent (paper Table 1)."""
  sd = model_stats.forward_gflops(UNet.from_config(_config("sd15.py")), 64)
  md = model_stats.forward_gflops(UNet.from_config(_config("mobilediffusion.py")), 64)
  assert abs(sd / 392 - 1) < 0.01, sd
  assert abs(md / 182 - 1) < 0.02, md


@pytest.mark.parametrize("config_name", ["tiny.py", "mobilediffusion.py", "sd15.py"])
def test_every_param_is_logically_partitioned(config_name):
  _, boxed = _abstract(config_name)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim, leaf.names


def _mesh_and_rules():
  return sharding.create_mesh({"data": 2, "fsdp": 4}), sharding.DEFAULT_LOGICAL_AXIS_RULES


def test_full_md_shardings_cover_big_kernels():
  """Every ≥1M-element MD param would be split 4 ways over fsdp: nothing big sits on one device."""
  mesh, rules = _mesh_and_rules()
  _, boxed = _abstract("mobilediffusion.py")
  shardings = sharding.logical_to_shardings(boxed, mesh, rules)
  shapes = nn.meta.unbox(boxed)
  big = [
    (path, s)
    for (path, s), leaf in zip(
      jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(shapes)
    )
    if leaf.size >= 1_000_000
  ]
  assert len(big) > 50
  for path, s in big:
    assert "fsdp" in jax.tree.leaves(tuple(s.spec)), jax.tree_util.keystr(path)
  pairs = list(zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)))
  per_device = sum(np.prod(s.shard_shape(leaf.shape)) for s, leaf in pairs)
  total = sum(leaf.size for leaf in jax.tree.leaves(shapes))
  assert per_device < 0.3 * total  # ~1/4 per device plus small replicated params


def test_tiny_sharded_init():
  mesh, rules = _mesh_and_rules()
  unet = UNet.from_config(_config("tiny.py"))
  inputs = _inputs(unet)
  # rbg keys: same init semantics, several times faster to compile on CPU than threefry.
  boxed_init = lambda: unet.init(jax.random.key(0, impl="unsafe_rbg"), *inputs)
  shardings = sharding.logical_to_shardings(jax.eval_shape(boxed_init), mesh, rules)
  variables = jax.jit(lambda: nn.meta.unbox(boxed_init()), out_shardings=shardings)()
  # Biggest kernel: the 64->384 FFN input projection of a 64-wide transformer layer.
  kernel = variables["params"]["innermost"]["mid_transformer"]["layer_0"]["ffn"]["wi"]["kernel"]
  assert kernel.shape == (64, 384)
  assert len(kernel.addressable_shards) == 8
  for shard in kernel.addressable_shards:
    assert shard.data.shape == (16, 384)  # "embed" over fsdp=4, replicated over data=2
  conv_kernel = variables["params"]["up_0"]["block_0"]["conv_0"]["kernel"]
  assert conv_kernel.addressable_shards[0].data.shape == (3, 3, conv_kernel.shape[2] // 4, 32)

  out = _apply(unet)(jax.device_get(variables["params"]), *inputs)
  # A fresh model predicts exactly 0 (zero-init conv_out) and has a zero null text embedding.
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  np.testing.assert_array_equal(np.asarray(variables["params"]["null_text_emb"]), 0.0)


def test_sharded_forward_matches_single_device(tiny, tiny_params):
  mesh, rules = _mesh_and_rules()
  inputs = _inputs(tiny, batch=8)
  with mesh, nn.logical_axis_rules(rules):
    x, t, text = (jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim)) for a in inputs)
    out = _apply(tiny)(tiny_params, x, t, text)
  assert len(out.sharding.device_set) == 8
  expected = _apply(tiny)(tiny_params, *(a[:2] for a in inputs))
  np.testing.assert_allclose(np.asarray(out[:2]), np.asarray(expected), atol=1e-5)


def test_bf16_compute_keeps_fp32_params(tiny, tiny_params):
  bf16 = tiny.clone(dtype=jnp.bfloat16)
  inputs = _inputs(tiny)
  fresh = jax.eval_shape(bf16.init, jax.random.key(0), *inputs)
  assert {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(fresh))} == {jnp.dtype(jnp.float32)}
  out = _apply(bf16)(tiny_params, *inputs)
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  ref = _apply(tiny)(tiny_params, *inputs)
  assert float(jnp.max(jnp.abs(out - ref))) > 0  # really computed in bf16 ...
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.max(jnp.abs(ref))))  # ... and close
  with cpu_lowering.portable():  # the ops TPUs and GPUs get (a CPU's sum bf16 products in f32)
    jaxpr = str(jax.make_jaxpr(bf16.apply)({"params": tiny_params}, *inputs))
  matmuls = [line for line in jaxpr.splitlines() if "dot_general" in line or "conv_general" in line]
  assert matmuls and all("bf16[" in line.split("=")[0] for line in matmuls), matmuls[:3]


def test_remat_keeps_params_and_gradients(tiny):
  remat = tiny.clone(remat=True)
  inputs = _inputs(tiny)
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(m.init, jax.random.key(0), *inputs))
  assert shapes(remat) == shapes(tiny)  # same checkpoint paths with and without remat
  # Gradients through one rematerialised transformer stack equal the plain ones.
  x, context = jax.random.normal(jax.random.key(0), (2, 4, 4, 32)), inputs[2]
  block = lambda r: SpatialTransformer(depth=2, head_dim=16, num_groups=8, remat=r)
  params = _host_random(jax.eval_shape(block(False).init, jax.random.key(1), x, context))
  grad = lambda r: jax.jit(jax.grad(lambda p: jnp.sum(block(r).apply(p, x, context) ** 2)))(params)
  for a, b in zip(jax.tree.leaves(grad(False)), jax.tree.leaves(grad(True))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-7)


def test_model_stats_row_for_tiny():
  stats = model_stats.model_stats(_config("tiny.py"), latent_size=8)
  assert stats["params"] == model_stats.param_count(UNet.from_config(_config("tiny.py")))
  assert 2e5 < stats["params"] < 5e6
  assert (stats["num_conv_blocks"], stats["num_sa"], stats["num_ca"]) == (8, 2, 4)
  assert 0 < stats["gflops"] < 1
  assert set(stats["ablations"]) == {"shared_kv", "ffn_expansion_3", "separable_conv"}
  for a in stats["ablations"].values():
    assert a["saved"] > 0


def test_self_conditioning_reads_the_previous_estimate_and_none_is_zeros():
  unet = UNet.from_config({**_config("tiny.py").to_dict(), "self_condition": True})
  params = _random_params(unet)
  x, t, text = _inputs(unet, size=8)
  estimate = jax.random.normal(jax.random.key(5), x.shape)
  without = _apply(unet)(params, x, t, text)
  np.testing.assert_array_equal(without, _apply(unet)(params, x, t, text, x0_estimate=0 * x))
  assert (
    float(jnp.abs(_apply(unet)(params, x, t, text, x0_estimate=estimate) - without).max()) > 1e-3
  )
  plain = UNet.from_config(_config("tiny.py"))
  with pytest.raises(ValueError, match="without self_condition"):
    plain.apply({"params": _random_params(plain)}, x, t, text, x0_estimate=estimate)


@pytest.mark.parametrize("block_type", ["resnet", "separable"])
def test_scale_shift_norm_gates_features_and_zero_projection_is_plain_norm(block_type):
  """`scale_shift_norm`: the embedding's projection is 2·C wide and multiplies the normalised
  features by (1 + scale); with that projection zero, the block is the additive block with its
  projection zero (both are the plain GN → conv path)."""
  from md_jax.models.conv_blocks import conv_block

  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  temb = jax.random.normal(jax.random.key(1), (2, 32))
  kw = {"num_groups": 4, "expansion": 2, "remat": False, "dtype": jnp.float32}
  gated = conv_block(block_type, 16, name="b", param_dtype=jnp.float32, scale_shift=True, **kw)
  added = conv_block(block_type, 16, name="b", param_dtype=jnp.float32, **kw)
  params = nn.meta.unbox(gated.init(jax.random.key(2), x, temb))["params"]
  # Non-zero output convs, so that a fresh block is not the identity and the paths differ.
  noise = lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape)
  params = jax.tree.map(noise, params)
  assert params["temb_proj"]["kernel"].shape == (32, 32)  # a scale and a shift for 16 channels

  def with_projection(kernel, bias):
    return {"params": {**params, "temb_proj": {"kernel": kernel, "bias": bias}}}

  # A scale of −1 (kernel zero, scale bias −1) closes the gate: the residual branch then sees
  # zeros whatever x is, so the block adds one constant to its input. An added embedding cannot
  # do that.
  closed = with_projection(jnp.zeros((32, 32)), jnp.zeros(32).at[:16].set(-1.0))
  residual = gated.apply(closed, x, temb) - x
  assert float(jnp.max(jnp.abs(residual - residual[:1, :1, :1]))) < 1e-5
  assert float(jnp.max(jnp.abs(residual))) > 1e-3
  zero_gated = with_projection(jnp.zeros((32, 32)), jnp.zeros(32))
  zero_added = {
    "params": {**params, "temb_proj": {"kernel": jnp.zeros((32, 16)), "bias": jnp.zeros(16)}}
  }
  np.testing.assert_allclose(
    gated.apply(zero_gated, x, temb), added.apply(zero_added, x, temb), rtol=1e-5, atol=1e-5
  )

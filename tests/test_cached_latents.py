"""Cached latents (issue 44, item 3): the frozen encoders' outputs written once by
`md_jax.cache_latents` and read by the diffusion stage instead of images and captions."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from md_jax import cache_latents
from md_jax.data import latent_cache
from md_jax.data.pipeline import create_input_iterator
from md_jax.infra import sharding
from md_jax.training import diffusion, preflight
from tests.test_multihost import _free_port
from tests.test_trainer import REPO, _config, _train

RULES = sharding.DEFAULT_LOGICAL_AXIS_RULES
# Steps compile on one device, 2-3x faster than on 8 (the batches' sharding is the iterator
# test's; the step's sharding is tests/test_trainer.py's, cache or not).
ONE_DEVICE = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.num_devices": 1}


@pytest.fixture(scope="module")
def cache(shapes_data_dir, tmp_path_factory):
  """float32 caches of the tiny run's two phases (16 and 32 px), 4 shards of 128 rows each."""
  out = tmp_path_factory.mktemp("cache") / "latents"
  report = cache_latents.cache_latents(
    _config(shapes_data_dir), str(out), examples_per_shard=128, batch_size=48, dtype="float32"
  )
  return str(out), report


def _files(directory):
  return {p: open(os.path.join(directory, p), "rb").read() for p in sorted(os.listdir(directory))}


def test_the_cache_holds_every_row_in_order_in_shards(cache):
  out, report = cache
  assert report[16] == {"examples": 512, "skipped": 0, "shards": 4, "written_now": [0, 1, 2, 3]}
  source = latent_cache.data_source(out, 32, "train")
  assert len(source) == 512
  row = source[200]
  assert row["index"] == 200
  assert row["latents"].shape == (8, 8, 8) and row["latents"].dtype == np.float32
  assert row["text_states"].shape == (77, 64) and row["tokens"].shape == (77,)


@pytest.mark.parametrize("learned_null_text", [True, False])
def test_a_step_on_cached_latents_has_the_loss_of_a_step_on_images(
  cache, shapes_data_dir, learned_null_text
):
  """Same state, same step rngs, the same rows: the same loss, captions dropped for classifier-
  free guidance included (without a learned null text, their states are the empty prompt's)."""
  out, _ = cache
  # Many dropped captions in 16 rows.
  settings = {"condition_dropout": 0.5, "model.learned_null_text": learned_null_text}
  config = _config(shapes_data_dir, **settings, **ONE_DEVICE)
  cached_config = _config(shapes_data_dir, **settings, **ONE_DEVICE, **{"latents.cached": out})
  mesh = sharding.create_mesh(config.mesh)
  images, cached = diffusion.DiffusionStage(config), diffusion.DiffusionStage(cached_config)
  with nn.logical_axis_rules(RULES):  # as the trainer: init outside the mesh, steps inside
    rng = jax.random.key_data(jax.random.key(config.seed))
    _, _, init = sharding.create_sharded_state(images.init_state, rng, mesh, RULES)
    state = init(rng)
  with nn.logical_axis_rules(RULES), jax.set_mesh(mesh):
    kwargs = {"global_batch_size": 16, "mesh": mesh, "rules": RULES}
    iterators = [create_input_iterator(config.data, cached_latents=c, **kwargs) for c in ("", out)]
    # The loss `train_step` differentiates, at the state's first two steps' rngs. The UNet's
    # zero-initialised output projections would hide the text from it: every weight is jittered.
    rng = np.random.default_rng(1)  # numpy's: JAX would compile a program per leaf shape
    unet_params = jax.tree.map(
      lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32),
      state.unet.params,
    )
    params = (unet_params, state.text_encoder)
    losses = [jax.jit(images.loss), jax.jit(cached.loss)]
    for step in range(2):
      state = state.replace(unet=state.unet.replace(step=step))
      batches = [next(it) for it in iterators]
      np.testing.assert_array_equal(batches[0]["tokens"], batches[1]["tokens"])
      (a, _), (b, _) = [loss(params, state, x) for loss, x in zip(losses, batches)]
      np.testing.assert_allclose(a, b, rtol=1e-6)
  for it in iterators:
    it.close()


def test_the_cached_iterator_resumes_bitwise(cache, shapes_data_dir):
  out, _ = cache
  mesh = sharding.create_mesh((2, 4))
  data = _config(shapes_data_dir).data

  def iterator():
    return create_input_iterator(data, global_batch_size=16, mesh=mesh, rules=RULES,
                                 cached_latents=out)  # fmt: skip

  it = iterator()
  next(it)
  position = it.get_state()
  expected = [jax.device_get(next(it)) for _ in range(2)]
  it.close()
  resumed = iterator()
  resumed.set_state(position)
  for want in expected:
    got = jax.device_get(next(resumed))
    assert set(got) == {"latents", "text_states", "tokens"}
    assert got["latents"].dtype == np.float32 and got["latents"].shape == (16, 4, 4, 8)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  resumed.close()


def test_a_run_trains_checkpoints_and_samples_from_the_cache(cache, shapes_data_dir, tmp_path):
  out, _ = cache
  config = _config(
    shapes_data_dir, total_steps=2, sample_every=2, sample_steps=1, **ONE_DEVICE,
    **{"latents.cached": out},
  )  # fmt: skip
  state = _train(config, tmp_path)
  assert int(state.step) == 2
  assert (tmp_path / "samples" / "00000002.png").exists()


def test_a_rerun_rewrites_only_a_missing_shard_byte_for_byte(cache, shapes_data_dir):
  out, _ = cache
  directory = latent_cache.resolution_dir(out, 16)
  before = _files(directory)
  shard = latent_cache.shard_template(directory, "train").sharded_filepath(
    shard_index=2, num_shards=4
  )
  os.remove(shard)
  config = _config(shapes_data_dir)
  report = cache_latents.cache_latents(
    config, out, resolutions=[16], examples_per_shard=128, batch_size=48, dtype="float32"
  )
  assert report[16]["written_now"] == [2]
  assert _files(directory) == before
  with pytest.raises(ValueError, match=r"--out: .* caches examples_per_shard=128, .* asks for 100"):
    cache_latents.cache_latents(config, out, resolutions=[16], examples_per_shard=100)


def test_a_float16_cache_holds_the_float32_values_rounded(cache, shapes_data_dir, tmp_path):
  out = str(tmp_path / "f16")
  config = _config(shapes_data_dir)
  cache_latents.cache_latents(config, out, resolutions=[16], examples_per_shard=512, batch_size=48)
  half, full = (latent_cache.data_source(o, 16, "train")[300] for o in (out, cache[0]))
  for key in ("latents", "text_states"):
    assert half[key].dtype == np.float16
    np.testing.assert_allclose(half[key].astype(np.float32), full[key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_two_processes_write_the_bytes_one_process_writes(cache, shapes_data_dir, tmp_path):
  """Each process of a `--distributed` run writes its own shards; process 0 the dataset info."""
  out, _ = cache
  flags = [
    "--config=configs/diffusion.py:tiny", "--config.data.dataset=shapes/r32_small",
    f"--config.data.data_dir={shapes_data_dir}", "--config.data.num_threads=2",
    f"--out={tmp_path}", "--resolutions=16", "--examples_per_shard=128", "--batch_size=48",
    "--dtype=float32", "--distributed", f"--coordinator_address=127.0.0.1:{_free_port()}",
    "--num_processes=2",
  ]  # fmt: skip
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's 8 devices per process, its cache
  command = [sys.executable, "-m", "md_jax.cache_latents", *flags]
  pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
  processes = [
    subprocess.Popen([*command, f"--process_id={i}"], cwd=REPO, env=env, **pipes) for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-4000:]
  assert '"written_now": [0, 2]' in outputs[0]  # process 1 wrote shards 1 and 3
  assert _files(tmp_path / "r16") == _files(latent_cache.resolution_dir(out, 16))


@pytest.mark.parametrize(
  "overrides, error, match",
  [
    ({"latents.cached": "{tmp}/nowhere"}, FileNotFoundError,
     r"config.latents.cached='.*nowhere': the 16 px cache .* is missing"),
    ({"latents.downsample": 2}, ValueError,
     r"config.latents.cached='.*' holds latents of shape \(4, 4, 8\) at 16 px, but this run "
     r"reads \(8, 8, 8\)"),
    ({"data.split": "validation"}, ValueError,
     r"config.latents.cached=.*: the 16 px cache holds splits \['train'\], not config.data.split"),
    ({"text_encoder.train": True}, ValueError,
     r"config.latents.cached=.* with config.text_encoder.train=True"),
  ],
)  # fmt: skip
def test_a_bad_cache_is_one_error_naming_config_latents_cached(
  cache, shapes_data_dir, tmp_path, overrides, error, match
):
  out, _ = cache
  overrides = {"latents.cached": out, **overrides}
  overrides["latents.cached"] = overrides["latents.cached"].format(tmp=tmp_path)
  config = _config(shapes_data_dir, **overrides)
  with pytest.raises(error, match=match):
    preflight.check_config(config, diffusion.DiffusionStage)


def test_the_full_size_step_on_cached_latents_traces_without_the_vae_encoder():
  """The paper config's step (`:smoke`: full-size shapes, nothing allocated) on the cache's
  arrays: 32×32×8 latents and 77×768 CLIP states at 256 px, and no encoder convolution left."""
  import jax.numpy as jnp

  from md_jax import config_utils

  config = config_utils.load_config(REPO / "configs/mobilediffusion.py:smoke")
  stages = {}
  for cached in ("", "(abstract)"):
    config.latents.cached = cached
    stages[cached] = diffusion.DiffusionStage(config)
  state = jax.eval_shape(stages[""].init_state, jax.ShapeDtypeStruct((2,), jnp.uint32))
  tokens = jax.ShapeDtypeStruct((8, 77), jnp.int32)
  batches = {
    "": {"image": jax.ShapeDtypeStruct((8, 256, 256, 3), jnp.float32), "tokens": tokens},
    "(abstract)": {
      "latents": jax.ShapeDtypeStruct((8, 32, 32, 8), jnp.float32),
      "text_states": jax.ShapeDtypeStruct((8, 77, 768), jnp.float32),
      "tokens": tokens,
    },
  }
  params = (state.unet.params, state.text_encoder)
  convolutions = {}
  for key, stage in stages.items():
    jaxpr = str(jax.make_jaxpr(stage.loss)(params, state, batches[key]))
    convolutions[key] = jaxpr.count("conv_general_dilated")
  encoder = str(jax.make_jaxpr(stages[""].pipeline.latent_space.encode)(
    state.autoencoder, batches[""]["image"]
  )).count("conv_general_dilated")  # fmt: skip
  assert encoder > 10 and convolutions["(abstract)"] == convolutions[""] - encoder

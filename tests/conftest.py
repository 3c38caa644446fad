"""Test setup: 8 fake CPU devices so every test exercises sharding, before jax is imported."""

import os
import pathlib
import tempfile

# Tests run a few steps of many small programs: compile time, not run time, is what they wait
# for, so LLVM's expensive optimisations are off, XLA:CPU emits fusions with its older emitters
# (the tiny diffusion step compiles in half the time; results move in the last bits only, ≤ 2e-8
# in its state after three steps) and codegen runs as one module, not split for threads that the
# two xdist workers leave no core for (12 % less). BENCHMARKS.md, 'The test suite (session 44)'.
# Speed is not tested.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8"
  + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  + " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, through the environment so that subprocesses
# (`python -m md_jax.main` in the SIGTERM and multi-process tests) share it: a run compiles the
# tiny model's step once, whichever process asks first.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="md_jax_test_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import numpy

# transformers and diffusers import torchvision when it is installed (pytorch-fid needs it), and
# the mirror's torchvision cannot load its compiled ops next to CPU torch: see the module.
from md_jax.tools.torchvision_compat import make_torchvision_importable

make_torchvision_importable()

# TensorFlow (tf.data, clu writers) must never grab an accelerator that JAX wants.
try:
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
except ImportError:
  pass

assert jax.device_count() == 8, "tests/conftest.py must run before anything imports jax"

# Orbax saves an array replicated over the mesh's data axis in slices, one per replica, and cuts
# each slice with a small jitted program per device and shape: hundreds of compilations (~20 s)
# the first time a test saves a new state. One replica writing each shard saves the same bytes.
import orbax.checkpoint as ocp  # noqa: E402

ocp.type_handlers.register_type_handler(
  jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)


import pytest  # noqa: E402

# The longest test files, longest first (BENCHMARKS.md, 'The test suite'). With `--dist loadfile`
# each xdist worker takes whole files in collection order (pyproject.toml turns off xdist's own
# order, by test count); a long file handed out late (the main job's) left the other worker idle
# for its last minutes.
LONGEST_FIRST = (
  "test_main_job.py",
  "test_trainer.py",
  "test_t2i_eval.py",
  "test_vae.py",
  "test_aot_compile.py",
  "test_step_distill.py",
  "test_ufogen.py",
  "test_checkpoint_integrity.py",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data dir holding the small `shapes/r32_small` config, built once per test session."""
  from md_jax.data.prepare import prepare_dataset

  data_dir = tmp_path_factory.mktemp("tfds")
  prepare_dataset("shapes/r32_small", str(data_dir))
  return str(data_dir)


@pytest.fixture(scope="session")
def diffusion_run(shapes_data_dir, tmp_path_factory):
  """A tiny diffusion checkpoint (2 steps) that generate, UFOGen and export tests start from; read
  only, so one training serves them all."""
  from tests.test_trainer import _config, _train

  workdir = tmp_path_factory.mktemp("diffusion")
  _train(_config(shapes_data_dir, total_steps=2), workdir)
  return workdir


@pytest.fixture(scope="session")
def latent_classifier_run(shapes_data_dir, tmp_path_factory):
  """A tiny `latent_classifier` run (40 steps) that the guidance, classifier-loss and
  representation-alignment tests read; read only, so one training serves them all."""
  from md_jax import config_utils
  from md_jax.training import latent_classifier, trainer

  workdir = tmp_path_factory.mktemp("latent_classifier")
  repo = pathlib.Path(__file__).parents[1]
  config = config_utils.load_config(repo / "configs/latent_classifier.py:tiny")
  config.data.data_dir = shapes_data_dir
  config.data.num_threads = 2
  config.report_every_secs = 1000
  trainer.train_and_evaluate(config, str(workdir), latent_classifier.LatentClassifierStage(config))
  return workdir


@pytest.fixture(scope="session")
def classifier_run(shapes_data_dir, tmp_path_factory):
  """A 10-step attribute classifier: the evaluators and the kind probe score with it."""
  from md_jax import config_utils
  from md_jax.training import shapes_classifier, trainer

  workdir = tmp_path_factory.mktemp("classifier")
  config = config_utils.load_config(
    pathlib.Path(__file__).parents[1] / "configs/shapes_classifier.py:tiny"
  )
  config.data.data_dir = shapes_data_dir
  config.num_train_steps = 10
  trainer.train_and_evaluate(config, str(workdir), shapes_classifier.ShapesClassifierStage(config))
  return str(workdir)


@pytest.fixture(scope="session")
def lora_path(diffusion_run, tmp_path_factory):
  """A LoRA file (rank 2, B drawn) for the tiny diffusion UNet: attention and projection kernels,
  and conv_out, the one a 2-step run's output is not still closed behind (zero-initialised)."""
  from md_jax.pipeline import lora_file
  from md_jax.pipeline.text_to_image import TextToImage
  from tests.test_lora_file import trained_factors

  _, params, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  path = tmp_path_factory.mktemp("lora") / "concept.safetensors"
  words = ("attn", "proj_in", "proj_out", "conv_out")
  factors = trained_factors(params.unet, rank=2, seed=0, words=words, std=0.3)
  lora_file.save_lora(path, factors, rank=2, alpha=2.0, base_params=params.unet)
  return path


@pytest.fixture(scope="session")
def plugin_workdir(diffusion_run, tmp_path_factory):
  """A canny plugin run's checkpoint for the tiny diffusion run, untrained but with every adapter
  weight moved off its zero init (so it steers), written without a training step."""
  import jax

  from md_jax import config_utils
  from md_jax.infra import checkpoints
  from md_jax.pipeline.control import adapter_from_config
  from md_jax.training import plugin

  config = config_utils.load_config(pathlib.Path(__file__).parents[1] / "configs/plugin.py:tiny")
  config = plugin.config_for_base(config, checkpoints.saved_config(str(diffusion_run)))
  adapter = adapter_from_config(config)
  condition = numpy.zeros((1, 16, 16, adapter.in_channels), numpy.float32)
  params = adapter.init(jax.random.key(0), condition)["params"]
  params = {"adapter": {"ema_params": _host(params, shift=0.05)}}
  workdir = tmp_path_factory.mktemp("plugin_run")
  writer = checkpoints.Checkpointer(workdir / "checkpoints", async_save=False)
  writer.save(1, params, {}, config)
  writer.close()
  return workdir


def _host(tree, shift=0.0):
  """Host numpy arrays of `tree`, unboxed, every leaf shifted by `shift`."""
  import flax.linen as nn
  import jax

  return jax.tree.map(lambda x: numpy.asarray(x) + numpy.float32(shift), nn.meta.unbox(tree))


@pytest.fixture
def parsed_flags():
  """absl's flags at their defaults, as a `python -m md_jax.benchmarks.NAME` run without flags has
  them (benchmark modules read their flags' values)."""
  from absl import flags

  was_parsed = flags.FLAGS.is_parsed()
  if not was_parsed:
    flags.FLAGS.mark_as_parsed()
  yield
  if not was_parsed:
    flags.FLAGS.unparse_flags()

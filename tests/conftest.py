"""Test setup: 8 fake CPU devices so every test exercises sharding, before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

# TensorFlow (tf.data, clu writers) must never grab an accelerator that JAX wants.
try:
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
except ImportError:
  pass

assert jax.device_count() == 8, "tests/conftest.py must run before anything imports jax"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data dir holding the small `shapes/r32_small` config, built once per test session."""
  from md_jax.data.prepare import prepare_dataset

  data_dir = tmp_path_factory.mktemp("tfds")
  prepare_dataset("shapes/r32_small", str(data_dir))
  return str(data_dir)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Tests that train the same tiny model in several runs compile its step once, not per run."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

"""Control plugins (issue 42): the adapter starts as a no-op, trains alone on a frozen diffusion
run, steers every sampler (the one-step UFOGen one included), and edge F1 scores it."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax import config_utils
from md_jax.data import conditions, shapes_scene
from md_jax.evaluation.edge_f1 import batch_edge_f1, edge_f1
from md_jax.infra import checkpoints
from md_jax.models.control_adapter import ControlAdapter
from md_jax.models.unet import UNet
from md_jax.pipeline.control import load_plugin
from md_jax.pipeline.text_to_image import TextToImage

REPO = pathlib.Path(__file__).parents[1]


def test_a_new_adapter_leaves_the_unet_output_unchanged():
  unet = UNet.from_config(config_utils.load_config(REPO / "configs/models/tiny.py"))
  adapter = ControlAdapter.for_unet(unet, downsample=4)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  t, text = jnp.array([10, 900]), jax.random.normal(jax.random.key(1), (2, 77, 64))
  params = unet.init(jax.random.key(2), x, t, text)
  condition = jax.random.uniform(jax.random.key(3), (2, 32, 32, 1), minval=-1, maxval=1)
  adapter_params = adapter.init(jax.random.key(4), condition)
  features = adapter.apply(adapter_params, condition)
  assert [f.shape for f in features] == [(2, 8, 8, 32), (2, 4, 4, 32)]
  # The activations before the (zero-initialised) conv_out: what a random UNet's output hides.
  base = unet.apply(params, x, t, text, features="last")
  out = unet.apply(params, x, t, text, adapter_features=features, features="last")
  np.testing.assert_array_equal(out, base)
  # A trained (non-zero) adapter changes them; a wrong layout is one error naming the level.
  moved = jax.tree.map(lambda p: p + 0.1, adapter_params)
  features = adapter.apply(moved, condition)
  out = unet.apply(params, x, t, text, adapter_features=features, features="last")
  assert np.abs(np.asarray(out - base)).max() > 1e-3
  with pytest.raises(ValueError, match=r"adapter_features\[1\] is \(2, 8, 8, 32\)"):
    unet.apply(params, x, t, text, adapter_features=(features[0], features[0]))


@pytest.fixture(scope="module")
def plugin_run(diffusion_run, shapes_data_dir, tmp_path_factory):
  """Three plugin steps on the tiny diffusion run."""
  from md_jax.training import plugin, trainer

  config = config_utils.load_config(REPO / "configs/plugin.py:tiny")
  config = plugin.config_for_base(config, checkpoints.saved_config(str(diffusion_run)))
  config.data.data_dir = shapes_data_dir
  config.data.num_threads = 2
  config.global_batch_size = 8
  config.num_train_steps = 3
  config.optimizer.warmup_steps = 0
  config.report_every_secs = 1000
  config.init_checkpoint = str(diffusion_run)
  workdir = tmp_path_factory.mktemp("plugin")
  state = trainer.train_and_evaluate(config, str(workdir), plugin.PluginStage(config))
  return workdir, jax.device_get(state)


def test_plugin_steps_move_only_the_adapter(plugin_run, diffusion_run):
  workdir, state = plugin_run
  assert int(state.step) == 3
  _, base, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  for name in ("unet", "text_encoder", "autoencoder"):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, name), getattr(base, name))
  adapter, params, config = load_plugin(str(workdir))
  assert config.stage == "plugin" and adapter.in_channels == 1
  out_kernels = [np.abs(params[f"out_{i}"]["kernel"]).max() for i in range(2)]
  assert min(out_kernels) > 0, "the zero-initialised output projections never moved"


@pytest.mark.parametrize("sampler, steps, cfg", [("ddim", 2, 3.0), ("ufogen", 1, 1.0)])
def test_generation_with_the_plugin(plugin_run, diffusion_run, sampler, steps, cfg):
  pipeline, params, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  adapter, adapter_params, _ = load_plugin(str(plugin_run[0]))
  images = [np.asarray(shapes_scene.render(shapes_scene.sample_scene(np.random.default_rng(i)), 32))
            for i in range(2)]  # fmt: skip
  edges = np.stack([conditions.compute("canny", x) for x in images])
  prompts = ["a large red circle in the center on a white background"] * 2
  kw = {"seed": 0, "resolution": 32, "sampler": sampler, "steps": steps, "cfg": cfg}
  plain = pipeline.generate(params, prompts, **kw)
  with_plugin = pipeline.generate(params, prompts, control=(adapter, adapter_params, edges), **kw)
  assert with_plugin.shape == (2, 32, 32, 3) and with_plugin.dtype == jnp.uint8
  # A plugin with weight in its projections must reach the UNet on this sampler's path.
  strong = jax.tree.map(lambda p: p + 0.05, adapter_params)
  steered = pipeline.generate(params, prompts, control=(adapter, strong, edges), **kw)
  assert np.any(np.asarray(steered) != np.asarray(plain))
  with pytest.raises(ValueError, match=r"control condition images are \(2, 16, 16, 1\)"):
    pipeline.generate(params, prompts, control=(adapter, adapter_params, edges[:, ::2, ::2]), **kw)


def test_edge_f1_on_hand_made_edges():
  square = np.zeros((12, 12), bool)
  square[2:10, 2] = square[2:10, 9] = square[2, 2:10] = square[9, 2:10] = True
  assert edge_f1(square, square) == 1.0
  shifted = np.roll(square, 1, axis=1)
  assert edge_f1(square, shifted, tolerance=1) == 1.0
  assert edge_f1(square, shifted, tolerance=0) < 0.6
  assert edge_f1(np.zeros((12, 12)), np.zeros((12, 12))) == 1.0
  assert edge_f1(square, np.zeros((12, 12))) == 0.0
  # A 10-px reference line; 5 predicted pixels on it (rows 0-4) and 5 far off: precision 5/10,
  # recall 6/10 (rows 0-5 lie within 1 px of a predicted pixel), F1 = 2·0.5·0.6/1.1.
  reference = np.zeros((12, 12), bool)
  reference[0:10, 0] = True
  predicted = np.zeros((12, 12), bool)
  predicted[0:5, 0] = True
  predicted[0:5, 11] = True
  assert edge_f1(reference, predicted) == pytest.approx(2 * 0.5 * 0.6 / 1.1)
  # A rendered scene's own Canny edges against its Canny condition map: a perfect score.
  image = np.asarray(shapes_scene.render(shapes_scene.sample_scene(np.random.default_rng(0)), 64))
  condition = conditions.compute("canny", image)
  assert condition.shape == (64, 64, 1) and condition.any()
  np.testing.assert_array_equal(batch_edge_f1(condition[None], image[None]), [1.0])

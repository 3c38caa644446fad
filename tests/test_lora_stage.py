"""Stage `lora` (issue 42 item 2): DreamBooth-LoRA factors train alone on a frozen diffusion run,
resume bitwise, export a file that applies to the base and to a one-step UFOGen generator, and
the concept detector reads rendered hexagons (and nothing else) as hexagons."""

import pathlib
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from md_jax import config_utils
from md_jax.data import concept, shapes_scene
from md_jax.evaluation import concept_eval
from md_jax.infra import checkpoints
from md_jax.models import lora
from md_jax.pipeline import lora_file
from md_jax.pipeline import lora_run as lora_run_lib
from md_jax.pipeline.text_to_image import TextToImage

REPO = pathlib.Path(__file__).parents[1]
STEPS = 4


def _config(diffusion_run, data_dir):
  config = config_utils.load_config(REPO / f"configs/lora.py:tiny,base={diffusion_run}")
  config.data.data_dir = data_dir
  config.data.num_threads = 2
  config.global_batch_size = 8
  config.lora.batch_size = 8
  config.lora.num_images = 8
  config.num_train_steps = STEPS
  config.checkpoint_every = 2
  config.max_checkpoints_to_keep = 5
  config.optimizer.warmup_steps = 0
  config.report_every_secs = 1000
  return config


def _train(config, workdir):
  from md_jax.training import dreambooth_lora, trainer

  state = trainer.train_and_evaluate(config, str(workdir), dreambooth_lora.LoRAStage(config))
  return jax.device_get(nn.meta.unbox(state))


@pytest.fixture(scope="module")
def lora_run(diffusion_run, shapes_data_dir, tmp_path_factory):
  """Four LoRA steps on the tiny diffusion run (checkpoints at 2 and 4), with the file export."""
  workdir = tmp_path_factory.mktemp("lora")
  config = _config(diffusion_run, shapes_data_dir)
  config.lora.export = str(workdir / "lora.safetensors")
  return workdir, config, _train(config, workdir)


def test_the_variant_takes_the_base_runs_model(lora_run, diffusion_run):
  _, config, _ = lora_run
  saved = checkpoints.saved_config(str(diffusion_run))
  assert config.init_checkpoint == str(diffusion_run) and config.stage == "lora"
  assert config.model.to_dict() == saved["model"]
  assert config.data.resolution == 32 and not config.text_encoder.train


def test_only_the_factors_train(lora_run, diffusion_run):
  state = lora_run[2]
  assert int(state.step) == STEPS
  pipeline, base, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  for name in ("unet", "text_encoder", "autoencoder"):  # bitwise the base's
    jax.tree.map(np.testing.assert_array_equal, getattr(state, name), getattr(base, name))
  paths = ["/".join(p) for p in _kernel_paths(state.lora.params)]
  assert paths and all(("_attn/" in p or "/proj_" in p) for p in paths), paths[:5]
  assert any("cross_attn/key" in p for p in paths) and any("proj_out" in p for p in paths)
  assert not any("conv" in p or "ffn" in p for p in paths)
  # B starts at zero; four steps moved every B. The optimizer holds the factors' moments only.
  b = [leaf for path, leaf in _leaves(state.lora.params) if path[-1] == "lora_b"]
  assert all(np.abs(x).max() > 0 for x in b)
  factor_shapes = {x.shape for x in jax.tree.leaves(state.lora.params)}
  assert {x.shape for x in jax.tree.leaves(state.lora.opt_state) if x.ndim} <= factor_shapes
  # The token's rows (pivotal tuning) moved from the base's, in a TrainState of their own; the
  # text encoder itself stayed the base's (checked above).
  ids = lora_run_lib.token_ids(pipeline.tokenizer, "sks")
  base_rows = np.asarray(base.text_encoder["token_embedding"]["embedding"])[ids]
  assert state.token.params.shape == base_rows.shape
  assert np.abs(state.token.params - base_rows).max() > 0


def _leaves(tree):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield tuple(str(getattr(k, "key", k)) for k in path), leaf


def _kernel_paths(factors):
  return sorted({path[:-1] for path, _ in _leaves(factors)})


def test_resume_is_bitwise(lora_run, tmp_path):
  workdir, config, state = lora_run
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(workdir, resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / str(STEPS))  # back to step 2's checkpoint
  config = config.copy_and_resolve_references()
  config.lora.export = ""
  resumed = _train(config, resumed_dir)
  assert int(resumed.step) == STEPS
  for part in ("lora", "token"):  # the factors' TrainState and the token rows'
    for name in ("step", "params", "opt_state", "ema_params", "rng"):
      jax.tree.map(
        np.testing.assert_array_equal,
        getattr(getattr(resumed, part), name),
        getattr(getattr(state, part), name),
      )


def test_the_file_applies_to_the_base_and_to_a_one_step_generator(
  lora_run, diffusion_run, shapes_data_dir, tmp_path
):  # fmt: skip
  workdir, config, state = lora_run
  _, manifest = lora_file.load_lora(workdir / "lora.safetensors")
  assert manifest["rank"] == config.lora.rank and manifest["info"]["token"] == "sks"
  assert manifest["info"]["step"] == STEPS
  # The tool's export of the last checkpoint is the same file.
  exported = tmp_path / "tool.safetensors"
  from_tool = lora_run_lib.export_checkpoint(str(workdir), exported)
  assert from_tool["base_weights_sha256"] == manifest["base_weights_sha256"]
  assert exported.read_bytes() == (workdir / "lora.safetensors").read_bytes()
  pipeline, base, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  applied = lora_file.apply_to(base, [(workdir / "lora.safetensors", 1.0)])
  expected = lora.merge(base.unet, state.lora.ema_params, config.lora.alpha, config.lora.rank)
  jax.tree.map(np.testing.assert_allclose, applied.unet, expected)
  # The file's token rows are the run's EMA rows, set where the tokenizer puts `sks`.
  ids = lora_run_lib.token_ids(pipeline.tokenizer, "sks")
  assert manifest["token_embedding"]["ids"] == ids
  table = np.asarray(applied.text_encoder["token_embedding"]["embedding"])
  np.testing.assert_array_equal(table[ids], state.token.ema_params)
  # A one-step UFOGen generator of this base: the layout its stage builds, other weights.
  from md_jax.training import ufogen
  from tests.test_ufogen import _ufogen_config

  stage = ufogen.UFOGenStage(_ufogen_config(shapes_data_dir, diffusion_run))
  abstract = jax.eval_shape(stage.init_state, jax.random.key_data(jax.random.key(0)))
  g_shapes = nn.meta.unbox(abstract.unet.params)
  rng = np.random.default_rng(3)  # numpy's: JAX would compile a program per leaf shape
  g = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), g_shapes)
  g_with = lora_file.apply_loras(g, [(workdir / "lora.safetensors", 1.0)])
  prompts = ["a large red sks on the left on a white background"] * 2
  kw = {"seed": 0, "resolution": 32, "sampler": "ufogen", "steps": 1, "cfg": 1.0}
  plain = pipeline.generate(base.replace(unet=g), prompts, **kw)
  steered = pipeline.generate(base.replace(unet=g_with), prompts, **kw)
  assert plain.shape == (2, 32, 32, 3) and np.any(np.asarray(plain) != np.asarray(steered))


def test_an_init_checkpoint_without_a_diffusion_unet_is_one_error(
  diffusion_run, shapes_data_dir, tmp_path
):  # fmt: skip
  vae_config = config_utils.load_config(REPO / "configs/vae.py:tiny")
  vae_dir = tmp_path / "vae"
  saver = checkpoints.Checkpointer(vae_dir / "checkpoints", async_save=False)
  saver.save(1, {"step": np.int32(1), "params": {"w": np.zeros(3, np.float32)}}, {}, vae_config)
  saver.close()
  config = _config(diffusion_run, shapes_data_dir)
  config.init_checkpoint = str(vae_dir)
  wanted = r"^config\.init_checkpoint=.* is a 'vae' run; a LoRAStage starts from one of \("
  with pytest.raises(ValueError, match=wanted + r"'diffusion', 'relu_finetune'\)$"):
    _train(config, tmp_path / "run")


@pytest.mark.parametrize("target", concept_eval.KINDS)
def test_the_detector_on_rendered_ground_truth(target):
  rng = np.random.default_rng(7)
  kinds = (*shapes_scene.KINDS, *concept_eval.KINDS)
  found = {}
  for i in range(240):
    scene = concept.concept_scene(rng)
    kind = kinds[i % len(kinds)]
    shape = shapes_scene.Shape(kind, scene.shapes[0].color, scene.shapes[0].size)
    image = shapes_scene.render(shapes_scene.Scene((shape,), *_rest(scene)), 64)
    found.setdefault(kind, []).append(concept_eval.is_kind(image, target))
  assert all(found[target]), f"a rendered {target} was not read as one"
  for kind in set(kinds) - {target}:
    assert not any(found[kind]), f"a rendered {kind} was read as a {target}"
  assert not concept_eval.is_kind(np.full((64, 64, 3), 128, np.uint8), target)  # no shape
  with pytest.raises(ValueError, match="no detector for kind 'oval'"):
    concept_eval.is_kind(image, "oval")


def _rest(scene):
  return scene.position, scene.background, scene.jitter


def test_the_concept_set_is_seeded_and_outside_the_dataset():
  a = concept.concept_set(6, 32, seed=0)
  b = concept.concept_set(6, 32, seed=0)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.captions == b.captions and a.images.shape == (6, 32, 32, 3)
  assert concept.concept_set(6, 32, seed=1).captions != a.captions
  assert "hexagon" not in shapes_scene.KINDS + shapes_scene.LABEL_NAMES["kind_1"]
  for caption in a.captions:  # the token takes the kind's place in the dataset's grammar
    assert shapes_scene.parse_caption(caption)["kind_0"] == "sks"
  with pytest.raises(ValueError, match="concept kind 'circle'"):
    concept.concept_set(2, 32, kind="circle")

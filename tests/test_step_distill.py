"""Progressive step distillation: the grids nest, the target is two teacher steps in one, the
student starts as the teacher and takes guidance in one call, rounds hand over and resume."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax import config_utils
from md_jax.diffusion import samplers, schedules
from md_jax.infra import checkpoints
from md_jax.pipeline.text_to_image import TextToImage
from md_jax.training import step_distill, trainer
from tests.test_trainer import _assert_bitwise_equal, _config, _host, _override

REPO = pathlib.Path(__file__).parents[1]


def _distill_config(data_dir, diffusion_run, **overrides):
  config = config_utils.load_config(REPO / "configs/step_distill.py:tiny")
  source = _config(data_dir)  # the diffusion run's model, text encoder and latent space
  config.model, config.text_encoder, config.latents = (
    source.model,
    source.text_encoder,
    source.latents,
  )
  config.model.guidance_embedding = True
  config.data = source.data
  config.data.resolution = 32
  config.step_distill.teacher_steps = 8  # 8 → 4 → 2
  config.progressive.resolutions, config.progressive.batch_sizes = (32, 32), (8, 8)
  config.progressive.steps = (2, 2)
  config.global_batch_size = 8
  config.checkpoint_every, config.log_every, config.sample_every = 1, 1, 0
  config.max_checkpoints_to_keep = 1
  config.report_every_secs = 1000
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.init_checkpoint = str(diffusion_run)
  return _override(config, overrides)


def _perturbed(params, seed: int = 5):
  """`params` + 0.1·N(0, 1): a barely trained UNet's output is near zero (conv_out starts at
  zero), which would make any two ways of calling it agree."""
  rng = np.random.default_rng(seed)  # numpy's: JAX would compile a program per leaf shape
  return jax.tree.map(
    lambda x: np.asarray(x) + 0.1 * rng.standard_normal(np.shape(x), np.float32), params
  )


def _differs(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32])
def test_the_trailing_grid_is_diffusers_and_holds_the_half_grid_at_every_other_point(steps):
  from diffusers import DDIMScheduler

  schedule = schedules.scaled_linear()
  reference = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
  reference.set_timesteps(steps)
  ours = samplers.ddim_timesteps(schedule, steps, spacing="trailing")
  np.testing.assert_array_equal(ours, reference.timesteps.numpy())
  double = samplers.trailing_timesteps(1000, 2 * steps, jnp.arange(2 * steps + 1))
  np.testing.assert_array_equal(
    double[::2], samplers.trailing_timesteps(1000, steps, jnp.arange(steps + 1))
  )
  assert double[-1] == -1


def test_one_step_to_the_target_lands_where_two_teacher_steps_do():
  schedule = schedules.scaled_linear()
  keys = jax.random.split(jax.random.key(0), 4)
  z_t = jax.random.normal(keys[0], (4, 8, 8, 4))
  t = jnp.array([999, 749, 499, 249])
  t_mid = jnp.array([874, 624, 374, 124])
  t_next = jnp.array([749, 499, 249, -1])

  def teacher(z, t):  # any map to (x̂_0, ε̂) consistent with z
    x0 = jnp.tanh(z + jax.random.normal(keys[1], z.shape))
    alpha, sigma = schedule.alpha_sigma(t, z)
    return x0, (z - alpha * x0) / sigma

  z_mid = step_distill.ddim_step(schedule, z_t, *teacher(z_t, t), t_mid)
  z_next = step_distill.ddim_step(schedule, z_mid, *teacher(z_mid, t_mid), t_next)
  target = step_distill.one_step_target(schedule, z_t, t, z_next, t_next)
  alpha, sigma = schedule.alpha_sigma(t, z_t)
  landed = step_distill.ddim_step(schedule, z_t, target, (z_t - alpha * target) / sigma, t_next)
  np.testing.assert_allclose(landed, z_next, atol=2e-5)
  np.testing.assert_allclose(target[-1], z_next[-1], atol=1e-6)  # to the clean end: x̃ = z_next


def test_bad_distillation_settings_name_their_key(shapes_data_dir, diffusion_run):
  for key, value, culprit in (
    ("step_distill.mode", "nope", "config.step_distill.mode"),
    ("step_distill.teacher_steps", 6, "config.step_distill.teacher_steps=6"),
    ("step_distill.guidance_range", (3.0, 2.0), "config.step_distill.guidance_range"),
    ("model.guidance_embedding", False, "config.model.guidance_embedding"),
    ("timestep_spacing", "linspace", "config.timestep_spacing"),
  ):
    config = _distill_config(shapes_data_dir, diffusion_run, **{key: value})
    with pytest.raises(ValueError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
      step_distill.StepDistillStage(config)


def test_the_student_starts_as_the_teacher_for_every_guidance_scale(shapes_data_dir, diffusion_run):
  stage = step_distill.StepDistillStage(_distill_config(shapes_data_dir, diffusion_run))
  rng = jax.random.key_data(jax.random.key(0))
  state = jax.jit(lambda r: nn.meta.unbox(stage.init_state(r)))(rng)
  tree, _ = checkpoints.load_state_tree(str(diffusion_run))
  tree["unet"]["ema_params"] = _perturbed(tree["unet"]["ema_params"])
  state = stage.initialize_from(state, tree)
  z = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
  t = jnp.array([900, 300])
  text = jax.random.normal(jax.random.key(2), (2, 77, stage.unet.text_dim))
  null = jnp.zeros_like(text)
  teacher_unet = stage.unet.clone(guidance_embedding=False)
  cond = teacher_unet.apply({"params": tree["unet"]["ema_params"]}, z, t, text)
  uncond = teacher_unet.apply({"params": tree["unet"]["ema_params"]}, z, t, null)
  for w in (1.0, 3.0):
    student = stage.unet.apply(
      {"params": state.unet.params}, z, t, text, guidance=jnp.full((2,), w)
    )
    np.testing.assert_allclose(student, cond, rtol=1e-5, atol=1e-5)  # the zero embedding adds 0
    guided, _ = stage.guided_x0_eps(
      state.teacher, z, t, text, null, jnp.full((2,), w), folded=False
    )
    expected = uncond + w * (cond - uncond)
    x0 = stage.schedule.to_x0_and_eps(expected, z, t, stage.prediction)[0]
    np.testing.assert_allclose(guided, x0, rtol=1e-4, atol=1e-4)
  assert np.abs(cond).mean() > 0.1 and np.abs(uncond - cond).mean() > 0.01  # w = 3 ≠ cond


def test_rounds_hand_the_student_to_the_teacher_keep_each_round_and_resume_bitwise(
  shapes_data_dir, diffusion_run, tmp_path
):
  config = _distill_config(shapes_data_dir, diffusion_run)
  straight = _host(
    trainer.train_and_evaluate(config, str(tmp_path / "a"), step_distill.StepDistillStage(config))
  )
  assert int(straight.step) == 4 and int(straight.round) == 1
  assert int(straight.student_steps) == 2  # 8 → 4 (round 0) → 2 (round 1)
  kept = sorted(int(p.name) for p in (tmp_path / "a/checkpoints").iterdir() if p.name.isdigit())
  assert kept == [2, 4]  # max_checkpoints_to_keep = 1, and round 0's last checkpoint
  round_0, _ = checkpoints.load_state_tree(str(tmp_path / "a/checkpoints/2"))
  assert int(round_0["round"]) == 0 and int(round_0["student_steps"]) == 4
  # round 1's teacher is round 0's student (EMA), and the student went on from it
  _assert_bitwise_equal(straight.teacher, round_0["unet"]["ema_params"])
  assert _differs(straight.unet.params, straight.teacher)  # the round-1 student trained on
  assert _differs(straight.teacher, round_0["teacher"])  # round 0 taught with the diffusion UNet

  # Stopped in round 1 after one step, then resumed: the same bits as the straight run.
  stopped = config.copy_and_resolve_references()
  stopped.total_steps = 3
  trainer.train_and_evaluate(stopped, str(tmp_path / "b"), step_distill.StepDistillStage(stopped))
  resumed = _host(
    trainer.train_and_evaluate(config, str(tmp_path / "b"), step_distill.StepDistillStage(config))
  )
  _assert_bitwise_equal(resumed, straight)


@pytest.fixture(scope="module")
def student_run(shapes_data_dir, diffusion_run, tmp_path_factory):
  """One round of one step from the tiny diffusion run: a student checkpoint to read."""
  overrides = {"progressive.steps": (1,), "progressive.resolutions": (32,)}
  config = _distill_config(shapes_data_dir, diffusion_run, **overrides)
  config.progressive.batch_sizes = (8,)
  workdir = tmp_path_factory.mktemp("student")
  trainer.train_and_evaluate(config, str(workdir), step_distill.StepDistillStage(config))
  return workdir


def test_the_student_samples_with_guidance_folded_in_one_call_per_step(student_run):
  pipeline, params, step, _ = TextToImage.from_checkpoint(str(student_run))
  assert step == 1 and pipeline.unet.guidance_embedding and pipeline.timestep_spacing == "trailing"
  params = params.replace(unet=_perturbed(params.unet))
  tokens = pipeline.tokenize(["a large red circle in the center"] * 2)
  images = pipeline.generate(params, tokens, seed=3, steps=4, cfg=3.0)
  text = pipeline.encode_text(params.text_encoder, tokens)

  def denoise(x, t):  # the scale as the UNet's input: one call per step, no CFG pair
    return pipeline.unet.apply({"params": params.unet}, x, t, text, guidance=jnp.full((2,), 3.0))

  x_T = jax.random.normal(jax.random.key(3), (2, *pipeline.latent_shape(32)))
  latents = samplers.ddim_sample(
    denoise, pipeline.schedule, x_T, 4, prediction=pipeline.prediction, spacing="trailing"
  )
  expected = np.asarray(
    jnp.clip(
      jnp.round((pipeline.latent_space.decode(params.autoencoder, latents) + 1) * 127.5), 0, 255
    )
  )
  assert np.abs(np.asarray(images, np.int32) - expected.astype(np.int32)).max() <= 1
  linspace = samplers.ddim_sample(
    denoise, pipeline.schedule, x_T, 4, prediction=pipeline.prediction
  )
  assert np.abs(linspace - latents).max() > 1e-2  # the grid matters: trailing is the one used


def test_the_student_exports_with_its_guidance_scale_as_an_input(student_run):
  from md_jax.export import programs, stablehlo

  source = programs.source_from_checkpoint(str(student_run), resolution=16)
  assert "one_step" not in source.kinds  # a one-step program is UFOGen's
  # Perturbed (the guidance embedding's last layer included): the scale changes the output, so
  # an input the program ignored would show.
  unet = _perturbed(source.params.unet)
  source.params = source.params.replace(unet=unet)
  (program,) = programs.build_programs(source, ["unet"], [2])
  assert [s.name for s in program.inputs] == ["latents", "timestep", "text_embeddings", "guidance"]
  inputs = programs.reference_inputs(program, source)
  exported = stablehlo.export_program(program)
  out = np.asarray(exported.call(*inputs.values()))
  latents, timestep, text, guidance = inputs.values()
  expected = source.pipeline.unet.apply(
    {"params": unet}, latents, timestep, text, guidance=guidance
  )
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  unguided = dict(inputs, guidance=np.full((2,), 1.0, np.float32))
  assert np.abs(np.asarray(exported.call(*unguided.values())) - out).max() > 1e-3

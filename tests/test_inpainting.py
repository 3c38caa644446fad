"""Training-free inpainting (`pipeline/inpainting.py`): the known region held at the input's
latents by every sampler, the rest drawn by the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md_jax.diffusion import samplers, schedules
from md_jax.pipeline import inpainting

SHAPE = (2, 4, 4, 3)


def _fake_model(seed: int):
  """A denoiser whose output depends on x and t, like a network's, but costs nothing."""
  w = jax.random.normal(jax.random.key(seed), (SHAPE[-1], SHAPE[-1])) * 0.3
  return lambda x, t: jnp.tanh(x @ w) + 1e-3 * t[:, None, None, None]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_keep_known_sets_x0_where_known_and_leaves_it_elsewhere(prediction):
  schedule = schedules.scaled_linear()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  known = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  keep = jnp.asarray(rng.integers(0, 2, (*SHAPE[:3], 1)), jnp.float32)
  t = jnp.array([999, 500], jnp.int32)
  model = _fake_model(1)
  x0_model, _ = schedule.to_x0_and_eps(model(x, t), x, t, prediction)
  wrapped = inpainting.keep_known(model, schedule, prediction, known, keep)
  x0, eps = schedule.to_x0_and_eps(wrapped(x, t), x, t, prediction)
  expected = np.where(np.asarray(keep) > 0, np.asarray(known), np.asarray(x0_model))
  np.testing.assert_allclose(x0, expected, atol=2e-4)
  alpha, sigma = schedule.alpha_sigma(t, x)  # the step stays on x_t = α x̂_0 + σ ε̂
  np.testing.assert_allclose(alpha * x0 + sigma * eps, x, atol=2e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "ufogen"])
def test_every_sampler_ends_on_the_known_latents_where_they_are_kept(sampler):
  schedule = schedules.scaled_linear()
  rng = np.random.default_rng(1)
  x_T = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  known = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
  keep = jnp.zeros((*SHAPE[:3], 1)).at[:, :, :2].set(1.0)  # the left half kept
  model = inpainting.keep_known(_fake_model(2), schedule, "v", known, keep)
  if sampler == "ddim":
    out = samplers.ddim_sample(model, schedule, x_T, 4, prediction="v")
  elif sampler == "dpm++":
    out = samplers.dpm_solver_pp_2m_sample(model, schedule, x_T, 4, prediction="v")
  else:
    out = samplers.ufogen_sample(model, schedule, x_T, 1, prediction="v")
  np.testing.assert_allclose(out[:, :, :2], known[:, :, :2], atol=1e-3)
  assert np.abs(np.asarray(out[:, :, 2:] - known[:, :, 2:])).max() > 0.1  # drawn, not copied


def test_a_latent_is_kept_only_when_every_pixel_under_it_is():
  masks = np.zeros((1, 8, 8), np.uint8)
  masks[0, 0, 0] = 255  # one repainted pixel in the top-left 4×4 patch
  masks[0, 4:, 4:] = 255  # the bottom-right patch entirely
  keep = np.asarray(inpainting.latent_keep_mask(masks, 4))[0, :, :, 0]
  np.testing.assert_array_equal(keep, [[0, 1], [1, 0]])


def test_generate_keeps_the_whole_image_under_an_empty_mask_and_checks_shapes(diffusion_run):
  """Nothing to repaint: one step gives the input's own reconstruction (encode → decode)."""
  from md_jax.data import shapes_scene
  from md_jax.pipeline.text_to_image import TextToImage, to_uint8

  pipeline, params, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  r = 16
  images = np.stack(
    [shapes_scene.render(shapes_scene.sample_scene(np.random.default_rng(i)), r) for i in (0, 1)]
  )
  prompts = ["a large red circle on a white background"] * 2
  kept = pipeline.generate(
    params, prompts, resolution=r, sampler="ufogen", steps=1,
    inpaint=inpainting.Inpaint(images, np.zeros((2, r, r), np.uint8)),
  )  # fmt: skip
  space = pipeline.latent_space
  latents = space.encode(params.autoencoder, jnp.asarray(images, jnp.float32) / 127.5 - 1)
  reconstruction = to_uint8(space.decode(params.autoencoder, latents))
  assert np.abs(np.asarray(kept, int) - np.asarray(reconstruction, int)).max() <= 1
  with pytest.raises(ValueError, match=r"inpainting images \(2, 16, 16, 3\) and masks \(2, 8, 8\)"):
    pipeline.generate(
      params, prompts, resolution=r, sampler="ufogen", steps=1,
      inpaint=inpainting.Inpaint(images, np.zeros((2, 8, 8), np.uint8)),
    )  # fmt: skip


def test_generate_inpaints_from_image_and_mask_files_and_names_bad_ones(diffusion_run, tmp_path):
  """`generate(image=, mask=)` (the CLI's --image/--mask): the files are resized and cropped to
  the sampling resolution, the mask's white square read as the region to repaint; a mask of
  another size, or one of the two alone, is one error naming the flag."""
  from PIL import Image

  from md_jax import generate
  from md_jax.data import shapes_scene

  scene = shapes_scene.render(shapes_scene.sample_scene(np.random.default_rng(4)), 32)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 8:24] = 255
  Image.fromarray(scene).save(tmp_path / "image.png")
  Image.fromarray(mask).save(tmp_path / "mask.png")
  prompts = ["a large red circle on a white background"]
  kw = dict(sampler="ufogen", steps=1, resolution=16)
  images, settings = generate.generate(
    str(diffusion_run), prompts, image=str(tmp_path / "image.png"),
    mask=str(tmp_path / "mask.png"), **kw,
  )  # fmt: skip
  assert settings["image"] == str(tmp_path / "image.png") and images.shape == (1, 16, 16, 3)
  loaded = inpainting.load_inpaint(tmp_path / "image.png", tmp_path / "mask.png", 16, 1)
  assert loaded.masks[0, 4:12, 4:12].all() and not loaded.masks[0, :3].any()
  Image.fromarray(mask[:16]).save(tmp_path / "short.png")
  with pytest.raises(ValueError, match=r"--mask=.*short.png.* must be the image's size"):
    generate.generate(
      str(diffusion_run), prompts, image=str(tmp_path / "image.png"),
      mask=str(tmp_path / "short.png"), **kw,
    )  # fmt: skip
  with pytest.raises(ValueError, match="--image and --mask go together"):
    generate.generate(str(diffusion_run), prompts, image=str(tmp_path / "image.png"), **kw)


def test_the_inpaint_condition_grays_out_one_objects_box_and_is_the_same_every_time():
  """The trained route's input map (`conditions.compute("inpaint", image)`): the image outside
  the mask, mid-gray inside, and the mask; in training the mask is an object's grown box, a
  function of the image alone (a resumed run sees the same maps)."""
  from md_jax.data import conditions, shapes_scene

  scene = shapes_scene.sample_scene(np.random.default_rng(0))
  image = shapes_scene.render(scene, 64)
  condition = conditions.compute("inpaint", image)
  assert condition.shape == (64, 64, conditions.channels("inpaint")) == (64, 64, 4)
  repaint = condition[..., 3] > 0
  foreground = conditions.foreground_mask(image) > 0
  assert repaint.any() and (repaint & foreground).sum() >= 0.5 * foreground.sum() / len(
    scene.shapes
  )
  np.testing.assert_array_equal(condition[repaint][:, :3], conditions.INPAINT_FILL)
  np.testing.assert_array_equal(condition[~repaint][:, :3], image[~repaint])
  np.testing.assert_array_equal(conditions.compute("inpaint", image), condition)
  # The box is the object's: its bounding box grown by the margin, nothing else.
  box = conditions.object_box_mask(image, margin=0) > 0
  ys, xs = np.nonzero(box)
  assert box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all() and box.sum() < 64 * 64 / 2

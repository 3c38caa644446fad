"""`python -m md_jax.generate` on a tiny diffusion checkpoint."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from md_jax import generate

REPO = pathlib.Path(__file__).parents[1]
PROMPTS = ["a large red circle on a white background", "a small blue square on a black background"]


@pytest.mark.parametrize("sampler, steps", [("ddim", 2), ("dpm++", 2), ("ufogen", 1)])
def test_every_sampler_makes_images_from_the_checkpoint(diffusion_run, sampler, steps):
  images, settings = generate.generate(
    str(diffusion_run), PROMPTS, sampler=sampler, steps=steps, cfg=3.0, seed=0, resolution=16
  )
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert settings["step"] == 2 and settings["sampler"] == sampler
  again, _ = generate.generate(
    str(diffusion_run), PROMPTS, sampler=sampler, steps=steps, cfg=3.0, seed=0, resolution=16
  )
  np.testing.assert_array_equal(images, again)  # the seed decides the noise
  if sampler == "ddim":
    other, _ = generate.generate(
      str(diffusion_run), PROMPTS, sampler=sampler, steps=steps, cfg=3.0, seed=1, resolution=16
    )
    assert not np.array_equal(images, other)


def test_cli_writes_pngs_with_their_prompts_and_reports_bad_input(diffusion_run, tmp_path):
  long_prompt = " ".join(["a large red circle"] * 30) + " on a white background"
  command = [
    sys.executable, "-m", "md_jax.generate", f"--workdir={diffusion_run}", f"--out={tmp_path}",
    f"--prompt={PROMPTS[0]}", f"--prompt={long_prompt}", "--steps=2", "--resolution=16",
  ]  # fmt: skip
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "truncated to 77" in result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["num_images"] == 2 and summary["sampler"] == "ddim"
  first = Image.open(tmp_path / "00.png")
  assert first.size == (16, 16) and first.text["prompt"] == PROMPTS[0]
  assert json.loads(first.text["settings"])["steps"] == 2
  assert (tmp_path / "grid.png").exists()

  missing = subprocess.run(
    [*command[:3], f"--checkpoint={tmp_path / 'nowhere'}", *command[4:]],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert missing.returncode != 0
  last_line = missing.stderr.strip().splitlines()[-1]
  assert last_line == f"FATAL --checkpoint='{tmp_path / 'nowhere'}' does not exist"
  assert "Traceback" not in missing.stderr


def test_frechet_distance_is_zero_for_the_same_features_and_the_mean_shift_otherwise():
  from md_jax.evaluation.shapes_eval import frechet_distance

  a = np.random.default_rng(0).normal(size=(500, 6))
  assert abs(frechet_distance(a, a)) < 1e-6
  shift = np.arange(6) * 0.5
  np.testing.assert_allclose(frechet_distance(a, a + shift), np.sum(shift**2), rtol=1e-6)
  assert frechet_distance(a, 2 * a) > 1.0  # wider: the covariance term counts


def test_shapes_eval_scores_generated_images_with_the_classifier(diffusion_run, classifier_run):
  from md_jax.evaluation import shapes_eval

  result = shapes_eval.evaluate(
    str(diffusion_run), classifier_run, steps=2, num_images=32, batch_size=16
  )
  assert result["num_images"] == 32 and result["checkpoint_step"] == 2
  assert set(result["accuracy"]) >= {"kind_0", "color_0", "background"}
  assert 0 <= result["all_attributes_correct"] <= result["overall_accuracy"] <= 1
  assert result["frechet_distance"] > 0 and result["images_per_s"] > 0
  assert set(result["kind_accuracy_by_size"]) == {"small", "large"}


def test_kind_accuracy_is_split_by_the_captioned_size():
  from md_jax.evaluation import metrics

  # First shapes: small ones right, the large one wrong. Second shapes: the large one right, the
  # small one wrong, the absent one (id 2, "none") right but counted in neither size.
  kind_correct = [np.array([True, True, False]), np.array([True, False, True])]
  size_ids = [np.array([0, 0, 1]), np.array([1, 0, 2])]
  by_size = metrics.kind_accuracy_by_size(kind_correct, size_ids)
  assert by_size == {"small": 2 / 3, "large": 1 / 2}


def test_caption_sensitivity_measures_each_swap_and_names_a_bad_one(diffusion_run):
  from md_jax.tools import caption_sensitivity

  caption = "a large red circle in the center on a white background"
  swaps = ["red:red", "red:blue"]
  result = caption_sensitivity.sensitivity(str(diffusion_run), caption, swaps, [500], 16)
  assert result["red:red"] == {"text": 0.0, "t=500": 0.0}  # no swap, no change
  # A 2-step run's text path into the UNet is still closed (zero-initialised projections), so
  # only the encoding is sure to move.
  assert result["red:blue"]["text"] > 0.01 and result["red:blue"]["t=500"] >= 0
  with pytest.raises(ValueError, match="--swap='green:blue'"):
    caption_sensitivity.sensitivity(str(diffusion_run), caption, ["green:blue"], [500], 16)


def test_kind_swap_replaces_the_first_kind_word_with_the_next_kind():
  from md_jax.tools import kind_probe

  kinds = [5, 6, 7, 8]  # token ids of circle, square, triangle, star
  tokens = np.array([[1, 5, 9, 6, 2], [1, 9, 8, 2, 0]])
  swapped, drawn = kind_probe.swap_kind_word(tokens, kinds)
  np.testing.assert_array_equal(swapped, [[1, 6, 9, 6, 2], [1, 9, 5, 2, 0]])
  np.testing.assert_array_equal(drawn, [1, 0])
  with pytest.raises(ValueError, match="caption 0 names no shape kind"):
    kind_probe.swap_kind_word(np.array([[1, 9, 2]]), kinds)


def test_kind_probe_scores_one_shot_and_sdedit_and_rejects_a_bad_timestep(
  diffusion_run, classifier_run
):
  from md_jax.tools import kind_probe

  result = kind_probe.probe(
    str(diffusion_run), classifier_run, [500], [400], num_images=16, batch_size=16
  )
  assert set(result["one_shot"]["t=500"]) == {"kind, cfg 1", "colour, cfg 1", "kind, cfg 3",
                                              "colour, cfg 3"}  # fmt: skip
  assert set(result["sdedit"]["t=400"]) == {"true_kept", "swap_kept", "swap_drawn"}
  assert set(result["reconstruction"]) == {"real", "decoded"}
  assert all(set(row) == {"kind", "colour"} for row in result["reconstruction"].values())
  values = [v for rows in result.values() for row in rows.values() for v in row.values()]
  assert all(0 <= v <= 1 for v in values)
  with pytest.raises(ValueError, match="timestep 1000"):
    kind_probe.probe(str(diffusion_run), classifier_run, [1000], [], num_images=16, batch_size=16)


def test_the_pipeline_reads_the_parts_the_checkpoint_layout_declares(diffusion_run, tmp_path):
  import jax

  from md_jax.infra import checkpoints
  from md_jax.pipeline.text_to_image import TextToImage

  pipeline, params, step, config = TextToImage.from_checkpoint(str(diffusion_run))
  saved, tree, _ = checkpoints.open_checkpoint(str(diffusion_run))
  assert step == 2 and config.stage == saved.stage == "diffusion"
  # The EMA params are sampled with, not the raw ones (which differ after two steps).
  jax.tree.map(np.testing.assert_array_equal, params.unet, tree["unet"]["ema_params"])
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, params.unet, tree["unet"]["params"])))
  images = pipeline.generate(params, PROMPTS, sampler="ufogen", steps=1, resolution=16, seed=0)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  key_data = np.asarray(jax.random.key_data(jax.random.key(0)))

  # A checkpoint without one of the declared parts fails in one line naming it.
  writer = checkpoints.Checkpointer(tmp_path / "checkpoints", async_save=False)
  writer.save(7, {k: v for k, v in tree.items() if k != "text_encoder"}, {}, saved)
  writer.close()
  with pytest.raises(checkpoints.CheckpointError, match=r"has no 'text_encoder': the text encoder"):
    TextToImage.from_checkpoint(str(tmp_path))
  # Another stage's checkpoint is named before any array is read; a raw uint32 key is a seed too.
  with pytest.raises(checkpoints.CheckpointError, match=r"is a 'diffusion' checkpoint; expected"):
    checkpoints.open_checkpoint(str(diffusion_run), "--checkpoint", ("vae", "decoder_distill"))
  np.testing.assert_array_equal(
    images,
    pipeline.generate(params, PROMPTS, sampler="ufogen", steps=1, resolution=16, seed=key_data),
  )


def test_a_stage_refuses_an_init_checkpoint_it_cannot_start_from_by_name():
  from md_jax.training.stage import Stage

  class Scratch(Stage):
    pass

  stage = Scratch()
  assert stage.load_pretrained("state") == "state" and stage.finalize("state", iter(())) == "state"
  assert stage.sample_images("state", {}) is None
  with pytest.raises(ValueError, match=r"init_checkpoint is set, but a Scratch starts from no"):
    stage.initialize_from("state", {})


@pytest.fixture(scope="module")
def control_png(tmp_path_factory):
  """A rendered `shapes` scene at 32 px: --control_image resizes it to the sampling resolution."""
  from md_jax.data import shapes_scene

  image = shapes_scene.render(shapes_scene.sample_scene(np.random.default_rng(3)), 32)
  path = tmp_path_factory.mktemp("control") / "scene.png"
  Image.fromarray(np.asarray(image)).save(path)
  return path


@pytest.mark.parametrize("sampler, steps", [("ddim", 2), ("ufogen", 1)])
def test_a_lora_at_scale_zero_changes_nothing_and_at_one_steers(
  diffusion_run, lora_path, sampler, steps
):
  kw = {"sampler": sampler, "steps": steps, "cfg": 3.0, "seed": 0, "resolution": 16}
  plain, settings = generate.generate(str(diffusion_run), PROMPTS, **kw)
  assert "loras" not in settings
  zero, settings = generate.generate(str(diffusion_run), PROMPTS, loras=[(lora_path, 0.0)], **kw)
  np.testing.assert_array_equal(zero, plain)
  assert settings["loras"][0]["file"] == str(lora_path) and settings["loras"][0]["scale"] == 0.0
  steered, settings = generate.generate(
    str(diffusion_run), PROMPTS, loras=[(lora_path, 1.0), (lora_path, 0.5)], **kw
  )
  assert not np.array_equal(steered, plain)
  assert [x["scale"] for x in settings["loras"]] == [1.0, 0.5]
  assert settings["loras"][0]["rank"] == 2


def test_a_plugin_with_its_control_image_steers_one_step_generation(
  diffusion_run, plugin_workdir, control_png, lora_path
):
  from md_jax.data import conditions
  from md_jax.pipeline import control

  # The 2-step run's zero-initialised conv_out is still ~5e-7: nothing inside its UNet, a
  # plugin's residuals included, reaches the pixels. The LoRA (on conv_out too) opens that path,
  # in both runs, and shows a plugin and a LoRA working together in one step.
  kw = {"sampler": "ufogen", "steps": 1, "cfg": 1.0, "seed": 0, "resolution": 16,
        "loras": [(lora_path, 1.0)]}  # fmt: skip
  plain, _ = generate.generate(str(diffusion_run), PROMPTS, **kw)
  steered, settings = generate.generate(
    str(diffusion_run), PROMPTS, plugin=str(plugin_workdir), control_image=str(control_png), **kw
  )
  assert steered.shape == plain.shape and not np.array_equal(steered, plain)
  assert settings["plugin"] == str(plugin_workdir) and settings["condition"] == "canny"
  assert settings["control_image"] == str(control_png)
  # The condition is the input pipeline's: the image resized (bicubic) to 16 px, then its edges.
  condition = control.condition_from_image(control_png, "canny", 16)
  small = Image.open(control_png).resize((16, 16), Image.Resampling.BICUBIC, reducing_gap=None)
  np.testing.assert_array_equal(condition, conditions.compute("canny", np.asarray(small)))
  assert condition.shape == (16, 16, 1) and condition.any()

  with pytest.raises(ValueError, match=r"--plugin='.*' needs --control_image=PATH"):
    generate.generate(str(diffusion_run), PROMPTS, plugin=str(plugin_workdir), **kw)
  with pytest.raises(ValueError, match=r"--control_image='nowhere.png' does not exist"):
    generate.generate(
      str(diffusion_run), PROMPTS, plugin=str(plugin_workdir), control_image="nowhere.png", **kw
    )
  kw["loras"] = [("nowhere.safetensors", 1.0)]
  with pytest.raises(ValueError, match=r"LoRA file 'nowhere.safetensors' does not exist"):
    generate.generate(str(diffusion_run), PROMPTS, **kw)


def test_lora_flag_values_parse_into_file_and_scale():
  assert generate.parse_lora_flag("a.safetensors") == ("a.safetensors", 1.0)
  assert generate.parse_lora_flag("dir/a.safetensors:0.25") == ("dir/a.safetensors", 0.25)
  assert generate.parse_lora_flag("gs://b/a.safetensors") == ("gs://b/a.safetensors", 1.0)
  assert generate.parse_lora_flag("gs://b/a.safetensors:-1e-1") == ("gs://b/a.safetensors", -0.1)
  with pytest.raises(ValueError, match=r"--lora=a.safetensors:strong: scale 'strong' is not a"):
    generate.parse_lora_flag("a.safetensors:strong")
  with pytest.raises(ValueError, match="finite SCALE"):
    generate.parse_lora_flag("a.safetensors:nan")


def test_cli_takes_lora_and_plugin_flags_and_records_them(
  diffusion_run, lora_path, plugin_workdir, control_png, tmp_path
):
  command = [
    sys.executable, "-m", "md_jax.generate", f"--workdir={diffusion_run}", f"--out={tmp_path}",
    f"--prompt={PROMPTS[0]}", "--sampler=ufogen", "--steps=1", "--cfg=1", "--resolution=16",
    f"--lora={lora_path}:0.5", f"--lora={lora_path}", f"--plugin={plugin_workdir}",
    f"--control_image={control_png}",
  ]  # fmt: skip
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  settings = json.loads(Image.open(tmp_path / "00.png").text["settings"])
  assert [(x["file"], x["scale"]) for x in settings["loras"]] == [
    (str(lora_path), 0.5), (str(lora_path), 1.0)
  ]  # fmt: skip
  assert settings["plugin"] == str(plugin_workdir) and settings["condition"] == "canny"
  # The flags reach generate() as the library call takes them: the same pixels.
  expected, _ = generate.generate(
    str(diffusion_run), PROMPTS[:1], sampler="ufogen", steps=1, cfg=1.0, resolution=16,
    loras=[(lora_path, 0.5), (lora_path, 1.0)], plugin=str(plugin_workdir),
    control_image=str(control_png), what="--workdir",
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "00.png")), expected[0])

  for bad, message in [
    (f"--lora={lora_path}:strong", f"FATAL --lora={lora_path}:strong: scale 'strong' is not a"),
    (f"--control_image={control_png}", f"FATAL --control_image='{control_png}' needs --plugin"),
  ]:
    flags = [a for a in command if not a.startswith(("--lora", "--plugin", "--control_image"))]
    failed = subprocess.run([*flags, bad], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith(message), failed.stderr[-2000:]


def test_bfloat16_inference_casts_the_weights_and_stays_near_float32(diffusion_run):
  from md_jax.pipeline.text_to_image import TextToImage

  full_pipeline, params, _, _ = TextToImage.from_checkpoint(str(diffusion_run))
  pipeline, _, _, _ = TextToImage.from_checkpoint(str(diffusion_run), dtype="bfloat16")
  cast = pipeline.weights_in_compute_dtype(params)
  for part in (cast.unet, cast.text_encoder):
    assert {leaf.dtype for leaf in jax.tree.leaves(part)} == {jnp.dtype(jnp.bfloat16)}
  assert jax.tree.leaves(cast.autoencoder)[0].dtype == np.float32  # its config's dtype, untouched
  # The denoiser on the text encoder's output, each in its dtype: near, not equal.
  tokens = full_pipeline.tokenize(PROMPTS)
  latents = jax.random.normal(jax.random.key(0), (2, *full_pipeline.latent_shape(16)))
  t = jnp.array([100, 900])

  def denoise(pipe, weights):
    text = pipe.encode_text(weights.text_encoder, tokens)
    return pipe.unet.apply({"params": weights.unet}, latents, t, text).astype(jnp.float32)

  want, got = denoise(full_pipeline, params), denoise(pipeline, cast)
  assert float(jnp.max(jnp.abs(got - want))) > 0
  np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.max(jnp.abs(want))))
  kw = {"sampler": "ufogen", "steps": 1, "seed": 0, "resolution": 16}
  images, settings = generate.generate(str(diffusion_run), PROMPTS, dtype="bfloat16", **kw)
  assert settings["dtype"] == "bfloat16" and images.shape == (2, 16, 16, 3)

"""The main job (`configs/main.py:quick`): every stage in order, every artifact, skip on rerun."""

import json
import pathlib

import numpy
import PIL.Image
import pytest

from md_jax import config_utils, main_job
from md_jax.infra import checkpoints, phases

REPO = pathlib.Path(__file__).parents[1]


def _quick_config(data_dir):
  config = config_utils.load_config(REPO / "configs/main.py:quick")
  for name in config.order:  # the session's small dataset instead of building shapes/r64
    config.stages[name].data.dataset = "shapes/r32_small"
    config.stages[name].data.data_dir = data_dir
    config.stages[name].data.num_threads = 2
    config.stages[name].report_every_secs = 1000
    # One device, as the quick job gets on a real CPU machine: the suite's 8 fake devices would
    # only add partitioning and per-device checkpoint slicing to every stage's compile and save
    # (sharded training is tested in tests/test_trainer.py and tests/test_sharding.py).
    config.stages[name].mesh.num_devices = 1
  return config


def test_quick_job_writes_every_artifact_and_a_rerun_skips_every_stage(
  shapes_data_dir, tmp_path, capsys
):
  config = _quick_config(shapes_data_dir)
  summary = main_job.run(config, str(tmp_path))
  for name in config.order:
    target = phases.final_step(main_job.resolve_workdir(config.stages[name], tmp_path))
    assert checkpoints.completed_step(tmp_path / name) == target, name
    saved = json.loads((tmp_path / name / "config.json").read_text())
    assert "{workdir}" not in json.dumps(saved), name  # the links between stages were filled in
  assert json.loads((tmp_path / "decoder_distill/config.json").read_text())["init_checkpoint"] == (
    str(tmp_path / "vae")
  )
  assert len(list((tmp_path / "samples").glob("[0-9][0-9].png"))) == len(config.samples.prompts)
  assert (tmp_path / "samples/grid.png").exists()
  assert set(json.loads((tmp_path / "stage_times.json").read_text())) == set(config.order)
  result = summary["evaluations"]["diffusion"]
  assert result["num_images"] == config.eval_images
  assert 0.0 <= result["overall_accuracy"] <= 1.0 and result["frechet_distance"] >= 0.0
  assert json.loads((tmp_path / "eval.json").read_text())["evaluations"]["diffusion"] == result
  guided = summary["evaluations"]["diffusion_guided"]  # the same sampler, classifier-guided
  assert guided["latent_classifier"] == str(tmp_path / "latent_classifier")
  assert guided["classifier_scale"] == config.evaluations.diffusion_guided.classifier_scale > 0
  assert result["latent_classifier"] is None and result["classifier_scale"] == 0.0
  # The exported one-step program, scored like the JAX one-step model on the same captions.
  exported, jax_one_step = (summary["evaluations"][k] for k in ("ufogen_litert_fp32", "ufogen"))
  assert exported["format"] == "litert_fp32" and exported["num_images"] == config.eval_images
  assert abs(exported["overall_accuracy"] - jax_one_step["overall_accuracy"]) <= 0.005
  _check_applications(config, tmp_path, summary["applications"])
  capsys.readouterr()

  # The rerun evaluates the plain sampler only: the other two would repeat its check (~20 s).
  config.evaluations = {"diffusion": config.evaluations.diffusion}
  config.artifact_evaluation.formats = ()
  del config["applications"]
  again = main_job.run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert out.count("skipped") == len(config.order), out
  # Nothing retrained: the same checkpoints give the same evaluation, image for image.
  assert again["evaluations"]["diffusion"]["overall_accuracy"] == result["overall_accuracy"]


def _check_applications(config, workdir, result):
  """The plugin and LoRA trained on the diffusion stage, scored with the teacher and the one-step
  G; inpainting training-free (the quick job leaves its plugin out); and their grid."""
  settings = config.applications
  assert json.loads((workdir / "eval.json").read_text())["applications"] == result
  for stage in ("plugin", "lora"):
    saved = json.loads((workdir / stage / "config.json").read_text())
    assert saved["init_checkpoint"] == str(workdir / "diffusion"), stage
  control = result["control"]
  assert control["num_images"] == settings.num_images
  for name in ("teacher", "teacher_plugin", "one_step", "one_step_plugin"):
    assert 0.0 <= control[name]["edge_f1"] <= 1.0 and 0.0 <= control[name]["accuracy"] <= 1.0
  lora = result["lora"]
  assert lora["lora"] == str(workdir / "lora/lora.safetensors") and lora["kind"] == "bar"
  assert lora["concept_rate_rendered"] == 1.0  # the detector reads the concept's own renders
  inpainting = result["inpainting"]
  assert inpainting["plugin"] is None and "trained" not in inpainting
  assert inpainting["num"] > 0 and 0.0 < inpainting["masked_fraction"] < 1.0
  # Four rows a module (control, LoRA, inpainting), three columns, 64 px cells, 2 px padding.
  grid = numpy.asarray(PIL.Image.open(workdir / "applications.png"))
  cell = 64 + 2
  assert grid.shape == (3 * settings.grid_rows * cell + 2, 3 * cell + 2, 3), grid.shape


def test_the_relu_variant_starts_the_one_step_generator_from_the_relu_finetune():
  softmax, relu = (
    config_utils.load_config(REPO / f"configs/main.py:{v}") for v in ("quick", "quick,relu")
  )
  assert softmax.stages.ufogen.init_checkpoint == "{workdir}/diffusion"
  assert softmax.stages.ufogen.model.attention_fn == "softmax"
  assert relu.stages.ufogen.init_checkpoint == "{workdir}/relu_finetune"
  assert relu.stages.ufogen.model.attention_fn == "relu"
  assert relu.order.index("relu_finetune") < relu.order.index("ufogen")
  # The applications train on G's base and are scored with it as the teacher.
  for config, base in ((softmax, "diffusion"), (relu, "relu_finetune")):
    for stage in ("plugin", "lora", "inpaint_plugin"):
      assert config.stages[stage].init_checkpoint == "{workdir}/" + base, stage
    assert config.applications.teacher.checkpoint == base
  assert relu.stages.lora.model.attention_fn == "relu"
  # The full job runs the relu finetune (and scores it) after the softmax model it starts from;
  # the quick job leaves it out unless asked (`quick,relu`).
  full = config_utils.load_config(REPO / "configs/main.py")
  assert full.order.index("diffusion") < full.order.index("relu_finetune")
  assert full.stages.relu_finetune.init_checkpoint == "{workdir}/diffusion"
  assert full.stages.relu_finetune.model.attention_fn == "relu"
  assert full.evaluations.relu_finetune.checkpoint == "relu_finetune"
  assert "relu_finetune" not in softmax.order
  with pytest.raises(ValueError, match="unknown variant 'quick,rleu'"):
    config_utils.load_config(REPO / "configs/main.py:quick,rleu")


def test_workdir_placeholders_are_filled_and_a_bad_order_is_named(tmp_path):
  config = config_utils.load_config(REPO / "configs/main.py:quick")
  diffusion = main_job.resolve_workdir(config.stages.diffusion, tmp_path)
  assert diffusion.latents.checkpoint == f"{tmp_path}/decoder_distill"
  assert config.stages.diffusion.latents.checkpoint == "{workdir}/decoder_distill"  # not mutated
  # A job for some stages only skips the samples and evaluations of the stages it leaves out.
  config.order = ("vae",)
  assert (
    main_job._write_samples(config, tmp_path) is None and main_job._evaluate(config, tmp_path) == {}
  )
  assert not (tmp_path / "samples").exists()
  config.order = ("vae", "ufogne")
  with pytest.raises(ValueError, match=r"config.order names \['ufogne'\]"):
    main_job.run(config, str(tmp_path))

"""`md_jax.export` on a tiny diffusion checkpoint: StableHLO → LiteRT and IREE, then verified by
running every artifact in its runtime against the JAX model."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from md_jax.export import bundle, manifest, programs, verify

REPO = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def checkpoint(diffusion_run):
  return diffusion_run


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory):
  """The fused one-step pipeline at batch 1 in every format (both IREE targets included) and the
  UNet at the guidance batch of 2 for LiteRT fp32 and IREE host: every route, few compiles."""
  out = tmp_path_factory.mktemp("export")
  source = programs.source_from_checkpoint(str(checkpoint), resolution=16)
  bundle.export_all(source, out, kinds=("one_step",), batches=(1,))
  unet = bundle.export_all(
    source, out / "unet", kinds=("unet",), batches=(2,), formats=("litert_fp32", "iree_host")
  )
  return out, unet


def test_export_writes_every_format_and_a_manifest_an_app_can_call_it_by(export_dir, checkpoint):
  out, _ = export_dir
  m = manifest.read(out)
  (entry,) = m["artifacts"]
  assert entry["name"] == "one_step_b1" and entry["batch"] == 1
  assert entry["inputs"] == [
    {"name": "token_ids", "shape": [1, 77], "dtype": "int32"},
    {"name": "noise", "shape": [1, 4, 4, 8], "dtype": "float32"},  # 16 px, f = 4, c = 8
  ]
  assert entry["outputs"] == [{"name": "image", "shape": [1, 16, 16, 3], "dtype": "float32"}]
  assert set(entry["files"]) == {"exported", "mlirbc", "mlir", "reference", *bundle.FORMATS}
  for name in entry["files"].values():
    assert (out / name).stat().st_size > 0, name
  assert m["source"]["checkpoint"] == str(checkpoint) and m["source"]["step"] == 2
  assert m["versions"]["jax"] and m["versions"]["litert-converter"]
  # Readable text with the weights elided, and the weights kept in the bytecode.
  text = (out / entry["files"]["mlir"]).read_text()
  assert "stablehlo.convolution" in text and "__elided__" in text
  assert entry["bytes"]["mlir"] < entry["bytes"]["mlirbc"]
  # fp16 and int8 store smaller weights than fp32.
  sizes = entry["bytes"]
  assert sizes["litert_int8"] < sizes["litert_fp16"] < sizes["litert_fp32"]


def test_every_runtime_computes_what_the_jax_model_computes(export_dir):
  out, _ = export_dir
  rows = verify.verify(out, runs=1)
  by_runtime = {r["runtime"]: r for r in rows}
  # Every runtime the default export has a file for (static int8 needs calibration: opt-in).
  assert set(by_runtime) == set(verify.BOUNDS) - {"litert_int8_static"}
  assert by_runtime["jax"]["max_rel"] <= 1e-4
  assert by_runtime["litert_fp32"]["max_rel"] <= 1e-3
  assert by_runtime["iree_host"]["max_rel"] <= 1e-3
  assert by_runtime["litert_fp16"]["max_rel"] <= 1e-2
  # fp16 weights really are rounded: its error is above fp32's.
  assert by_runtime["litert_fp16"]["max_abs"] > by_runtime["litert_fp32"]["max_abs"]
  assert all(r["ok"] for r in rows)
  for runtime in ("reference", *by_runtime):
    image = np.asarray(Image.open(out / "verify" / f"one_step_b1_{runtime}.png"))
    assert image.shape == (16, 16, 3), runtime


def test_the_unet_at_the_guidance_batch_matches_and_its_reference_is_the_model(
  export_dir, checkpoint
):
  _, unet = export_dir
  (entry,) = unet["artifacts"]
  assert [s["shape"] for s in entry["inputs"]] == [[2, 4, 4, 8], [2], [2, 77, 64]]
  # The stored reference is the JAX model itself, recomputed here from the checkpoint.
  source = programs.source_from_checkpoint(str(checkpoint), resolution=16)
  (program,) = programs.build_programs(source, ["unet"], [2])
  reference = np.load(pathlib.Path(export_dir[0]) / "unet" / entry["files"]["reference"])
  inputs = [reference[f"input/{s.name}"] for s in program.inputs]
  np.testing.assert_allclose(
    np.asarray(program.fn(program.weights, *inputs)),
    reference["output/prediction"],
    rtol=1e-5,
    atol=1e-5,
  )
  rows = verify.verify(pathlib.Path(export_dir[0]) / "unet", runtimes=("litert_fp32", "iree_host"))
  assert len(rows) == 2 and all(r["ok"] and r["max_rel"] <= 1e-3 for r in rows)


def test_verify_exits_nonzero_naming_the_artifact_and_runtime_that_disagree(export_dir, tmp_path):
  out, _ = export_dir
  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  reference = dict(np.load(broken / "one_step_b1/reference.npz"))
  reference["output/image"] = reference["output/image"] * 0.9  # a 10% wrong model
  np.savez(broken / "one_step_b1/reference.npz", **reference)
  result = subprocess.run(
    [sys.executable, "-m", "md_jax.export.verify", str(broken), "--runs=0",
     "--runtimes=jax,litert_fp32"],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 1, result.stderr[-2000:]
  assert "FAIL one_step_b1/jax" in result.stdout and "FAIL one_step_b1/litert_fp32" in result.stdout
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["passed"] is False


def test_bad_input_gets_one_line_errors(export_dir, checkpoint, tmp_path):
  source = programs.source_from_checkpoint(str(checkpoint), resolution=16)
  with pytest.raises(ValueError, match=r"--formats: unknown \['tflite'\]"):
    bundle.export_all(source, tmp_path / "x", kinds=("unet",), batches=(1,), formats=("tflite",))
  with pytest.raises(ValueError, match=r"--programs: \['vae'\] not exportable"):
    programs.build_programs(source, ["vae"], [1])
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    verify.verify(tmp_path)
  with pytest.raises(ValueError, match=r"--artifacts: \['unet_b1'\] not in"):
    verify.verify(export_dir[0], artifacts=["unet_b1"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    programs.source_from_checkpoint(str(tmp_path / "nope"))


def test_int8_quantizes_a_model_whose_convolution_weight_is_over_32_mib(tmp_path):
  """The full-size UNet's 3×3×1024×1024 convolution (37.7 MB) trips ai-edge-quantizer's chunked
  path; that op keeps float weights, the rest are int8, and the model still computes the conv."""
  import jax
  from jax import export

  from md_jax.export import litert

  rng = np.random.default_rng(0)
  big = rng.standard_normal((3, 3, 1024, 1024), np.float32) / 96
  small = rng.standard_normal((1, 1, 1024, 64), np.float32) / 32

  def two_convs(x):
    conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return conv(jax.nn.silu(conv(x, big)), small)

  x = rng.standard_normal((1, 4, 4, 1024), np.float32)
  exported = export.export(jax.jit(two_convs), platforms=["cpu"])(x)
  fp32 = litert.convert(exported.mlir_module_serialized, ["x"], ["y"], name="two_convs")
  assert len(litert._large_multidim_weight_ops(fp32)) == 1
  int8 = litert.quantize(fp32, "int8", name="two_convs")
  # The big conv's weight stays float (37.7 MB), the small one is int8: the file is ≈ fp32's.
  assert 0.95 * len(fp32) < len(int8) < len(fp32)
  (tmp_path / "int8.tflite").write_bytes(int8)
  y = litert.Runner(tmp_path / "int8.tflite")({"x": x})["y"]
  expected = np.asarray(two_convs(x))
  assert np.abs(y - expected).max() / np.abs(expected).max() < 0.05


def test_the_one_step_program_with_a_plugin_and_a_lora_draws_what_generate_draws(
  checkpoint, plugin_workdir, lora_path, tmp_path
):
  """`--plugin` and `--lora` on export: the LoRA merged into the UNet, the condition map an
  input. LiteRT's image equals `TextToImage.generate(control=...)`'s with that LoRA merged, for
  the same caption and noise; another condition draws another image."""
  import jax

  from md_jax.data import conditions, shapes_scene
  from md_jax.export import attachments, litert
  from md_jax.pipeline import control, lora_file
  from md_jax.pipeline.text_to_image import TextToImage, as_key

  source = programs.source_from_checkpoint(str(checkpoint), resolution=16)
  source = attachments.with_loras(source, [(str(lora_path), 1.0)])
  source = attachments.with_plugin(source, str(plugin_workdir))
  out = tmp_path / "export"
  m = bundle.export_all(
    source, out, kinds=("one_step_control",), batches=(1,), formats=("litert_fp32",)
  )
  (entry,) = m["artifacts"]
  assert entry["inputs"][2] == {"name": "condition", "shape": [1, 16, 16, 1], "dtype": "float32"}
  assert m["source"]["plugin"] == {"run": str(plugin_workdir), "condition": "canny"}
  assert [(x["file"], x["scale"]) for x in m["source"]["loras"]] == [(str(lora_path), 1.0)]
  assert all(r["ok"] for r in verify.verify(out, runs=0, runtimes=("jax", "litert_fp32")))

  pipeline, params, _, _ = TextToImage.from_checkpoint(str(checkpoint), dtype="float32")
  params = params.replace(unet=lora_file.apply_loras(params.unet, [(str(lora_path), 1.0)]))
  adapter, adapter_params, _ = control.load_plugin(str(plugin_workdir))
  scene = shapes_scene.render(shapes_scene.sample_scene(np.random.default_rng(5)), 16)
  condition = conditions.compute("canny", scene)[None]  # uint8 (1, 16, 16, 1)
  prompt = "a large red circle left of a small blue square on a white background"
  expected = pipeline.generate(
    params, [prompt], seed=3, resolution=16, sampler="ufogen", steps=1,
    control=(adapter, adapter_params, condition),
  )  # fmt: skip
  runner = litert.Runner(out / entry["files"]["litert_fp32"])
  inputs = {
    "token_ids": pipeline.tokenize([prompt]).astype(np.int32),
    "noise": np.asarray(jax.random.normal(as_key(3), (1, 4, 4, 8)), np.float32),
    "condition": condition.astype(np.float32) / 255,
  }
  image = runner(inputs)["image"]
  assert np.abs(np.round(image * 255) - np.asarray(expected, np.float32)).max() <= 1
  other = runner({**inputs, "condition": 1 - inputs["condition"]})["image"]
  assert np.abs(other - image).max() > 0.05
  # Static int8 would calibrate the condition on Gaussian noise: refused, naming the program.
  from md_jax.export import calibration

  (program,) = programs.build_programs(source, ("one_step_control",), (1,))
  with pytest.raises(ValueError, match="one_step_control_b1: litert_int8_static cannot calibrate"):
    calibration.calibration_inputs(program, source, 1)

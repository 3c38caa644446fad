"""Static (full-integer) int8: calibration inputs drawn from the data, an export whose convolutions
and matmuls take and give int8 activations, its error against fp32, and the flag's one error."""

import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from md_jax.data import pipeline as data_pipeline
from md_jax.data import tokenizer as tokenizer_lib
from md_jax.evaluation import artifact_pipeline
from md_jax.export import bundle, calibration, litert, programs, quant_report
from md_jax.infra import checkpoints

REPO = pathlib.Path(__file__).parents[1]
INT8, FLOAT32 = 9, 0  # the flatbuffer's TensorType codes


@pytest.fixture(scope="module")
def source(diffusion_run):
  return programs.source_from_checkpoint(str(diffusion_run), resolution=16)


def test_calibration_inputs_are_the_programs_shapes_from_real_training_captions(source):
  one_step, unet = (programs.build_programs(source, (k,), (b,))[0] for k, b in
                    (("one_step", 1), ("unet", 2)))  # fmt: skip
  samples = calibration.calibration_inputs(one_step, source, 6)
  assert len(samples) == 6
  for sample in samples:
    assert {k: (v.shape, str(v.dtype)) for k, v in sample.items()} == {
      s.name: (s.shape, s.dtype) for s in one_step.inputs
    }
  # The token rows are the tokenized captions of rows of the checkpoint's training split.
  config = ml_collections.ConfigDict(
    checkpoints.saved_config(str(source.description["checkpoint"]))
  )
  assert config.data.split == "train"
  split = set(data_pipeline.eval_captions(config.data))
  captions = calibration.training_captions(source, 6)
  assert set(captions) <= split and len(set(captions)) > 1
  tokens = tokenizer_lib.tokenize(source.pipeline.tokenizer, captions)
  np.testing.assert_array_equal(np.concatenate([s["token_ids"] for s in samples]), tokens)
  noise = np.stack([s["noise"] for s in samples])
  assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1
  # The UNet's: timesteps over the whole schedule, text embeddings of the captions.
  samples = calibration.calibration_inputs(unet, source, 8)
  for sample in samples:
    assert {k: (v.shape, str(v.dtype)) for k, v in sample.items()} == {
      s.name: (s.shape, s.dtype) for s in unet.inputs
    }
  steps = np.concatenate([s["timestep"] for s in samples])
  assert steps.min() == 0 and steps.max() == source.pipeline.schedule.num_steps - 1
  assert len(set(steps.tolist())) == len(steps)


def test_static_int8_export_has_int8_activations_and_stays_near_fp32(source, tmp_path):
  m = bundle.export_all(
    source, tmp_path, kinds=("one_step",), batches=(1,),
    formats=("litert_fp32", "litert_int8_static"), calibration_samples=16,
  )  # fmt: skip
  (entry,) = m["artifacts"]
  assert entry["files"]["litert_int8_static"] == "one_step_b1/int8_static.tflite"
  assert "litert_int8_static" in artifact_pipeline.FORMATS  # the evaluator scores it
  static = tmp_path / entry["files"]["litert_int8_static"]
  fp32 = tmp_path / entry["files"]["litert_fp32"]
  assert entry["bytes"]["litert_int8_static"] < 0.5 * entry["bytes"]["litert_fp32"]

  from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

  model = fb.read_model(bytearray(static.read_bytes()))
  graph = model.subgraphs[0]
  heavy = [
    op for op in graph.operators
    if fb.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
    in ("CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL")
  ]  # fmt: skip
  # Every convolution and matmul reads and writes int8 (not dynamic range's float activations).
  assert len(heavy) > 20
  for op in heavy:
    assert graph.tensors[op.inputs[0]].type == INT8 and graph.tensors[op.outputs[0]].type == INT8
  # The app's interface stays float: token ids in, noise in, image out.
  names = {graph.tensors[i].name.decode(): graph.tensors[i].type for i in graph.outputs}
  assert set(names.values()) == {FLOAT32}
  # Held-out inputs (another seed than the calibration's): the image's rms error within 0.1 of
  # its rms on average and 0.2 on every input (measured 0.02 to 0.07 on this 2-step model; a few
  # pixels of its 16 px image are off by up to 0.7, so the bound is on the rms, not the max).
  reference, quantized = litert.Runner(fp32, 1), litert.Runner(static, 1)
  program = programs.build_programs(source, ("one_step",), (1,))[0]
  rel = []
  for inputs in calibration.calibration_inputs(program, source, 4, seed=1):
    y, y_hat = reference(inputs)["image"], quantized(inputs)["image"]
    rel.append(float(np.sqrt(((y_hat - y) ** 2).mean() / (y**2).mean())))
  assert np.mean(rel) < 0.1 and max(rel) < 0.2, rel
  # The per-op report names ops with their precision and ranks the quantized ones.
  rows = quant_report.layer_errors(fp32.read_bytes(), static.read_bytes(), [inputs])
  result = quant_report.summary(rows, rel[-1], top=5, only_quantized=True)
  assert 0 < result["quantized_ops"] < result["ops"] == len(rows)
  assert len(result["worst"]) == 5 and {r["dtype"] for r in result["worst"]} == {"int8"}
  assert all(r["rel"] >= 0 and r["op"] for r in rows)


@pytest.mark.parametrize("num", [0, -3, 20_000])
def test_bad_calibration_samples_is_one_clear_error(num):
  with pytest.raises(ValueError, match=rf"--calibration_samples={num}: expected an integer in"):
    calibration.check_num_samples(num)


def test_bad_calibration_samples_flag_ends_with_one_fatal_line(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "md_jax.export", "--config=configs/mobilediffusion.py",
     f"--out={tmp_path}", "--formats=litert_int8_static", "--calibration_samples=0"],
    cwd=REPO, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    "FATAL --calibration_samples=0: expected an integer in [1, 10000]"
  )

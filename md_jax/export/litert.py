"""StableHLO → LiteRT `.tflite` (litert-converter, no TensorFlow), its fp16 and int8 variants
(ai-edge-quantizer), and running them in the LiteRT interpreter.

Variants, as a mobile engineer picks them:
  fp32  the converted graph as is.
  fp16  weights stored as float16 and dequantized to float32 at load (half the file; float math).
  int8  dynamic-range: weights int8 per output channel, activations quantized on the fly so
        convolutions and matmuls run in int8 (a quarter of the file; the error is reported).
  int8_static  full integer: weights int8 per output channel and activations int8 with ranges
        fixed by calibration on representative inputs (`md_jax.export.calibration`), so no
        float math is left in the quantized ops (what NPUs and DSPs run); the ops that
        `STATIC_FLOAT_OPS` and `STATIC_FLOAT_SCOPES` name stay float (see there).
"""

import contextlib
import os
import re

import numpy as np

VARIANTS = ("fp32", "fp16", "int8", "int8_static")
CALIBRATED = ("int8_static",)  # variants that need calibration inputs
_QUANTIZER_CHUNK_BYTES = 32 * 1024 * 1024
# What int8_static leaves in float, found with `md_jax.export.quant_report` on the main job's
# one-step model (image rel. rms error vs fp32 on held-out inputs; dynamic-range int8: 0.006):
#  * SELECT / SELECT_V2 / SOFTMAX: the text encoder's causal mask selects a huge negative logit
#    into the softmax input; one int8 scale over that range rounds every real logit to 0 and
#    the attention to uniform (text embeddings 96 % wrong, image error 0.73 however the rest is
#    quantized, 0.71 even with int16 activations). Float: 0.18.
#  * Normalization layers (GroupNorm, LayerNorm: scopes `/…norm…/`): the variance path squares
#    centred activations and averages them, a heavy-tailed range int8 cannot hold (each adds
#    0.25 to 0.36 rel. error). Float: 0.027, every convolution, matmul, attention product,
#    residual add and activation still int8 (weights and activations); but shape accuracy fell
#    0.029 below fp32's (512 held-out captions), outside the 0.02 asked of int8.
#  * The light decoder (scopes under `Autoencoder`): the last layers before the pixels, where
#    int8 error shows directly as edge noise. Float: 0.019 (text encoder or UNet in float
#    instead: 0.026, 0.023; first/last convs and time embedding also float: 0.019).
STATIC_FLOAT_OPS = ("SELECT", "SELECT_V2", "SOFTMAX")
STATIC_FLOAT_SCOPES = (r"/\w*norm\w*/", r"^jit\([^)]*\)/Autoencoder")


@contextlib.contextmanager
def mlir_context():
  import litert_converter.converter_api_ext as converter
  from litert_converter.mlir import ir

  context = ir.Context()
  converter.prepare_mlir_context(context)
  with context:
    yield context


def read_portable_artifact(context, portable_artifact: bytes):
  from litert_converter.mlir.dialects import stablehlo

  return stablehlo.deserialize_portable_artifact(context, portable_artifact)


def convert(portable_artifact: bytes, input_names, output_names, *, name: str) -> bytes:
  """The fp32 flatbuffer, its one signature ("serving_default") named like the StableHLO's
  arguments and results, so apps address tensors by name rather than by position."""
  import litert_converter.converter_api_ext as converter
  from litert_converter.mlir import passmanager

  with mlir_context() as context:
    module = read_portable_artifact(context, portable_artifact)
    converter.set_signature(module.operation, "serving_default", input_names, output_names)
    try:
      converter.run_convert_to_tfl_passes(
        module, passmanager.PassManager(), converter.ConvertToTFLConfig()
      )
    except ValueError as e:
      first = str(e).strip().splitlines()[0]
      raise ValueError(f"{name}: LiteRT conversion failed: {first}") from e
    return converter.export_flatbuffer_to_bytes(module.operation)


def quantize(
  flatbuffer: bytes, variant: str, *, name: str, calibration=None, float_scopes=None
) -> bytes:
  """`variant` of the fp32 `flatbuffer`; `calibration`: a list of {input name: array}, which
  the calibrated variants (CALIBRATED) need; `float_scopes`: regexes of op scopes int8_static
  leaves in float (default STATIC_FLOAT_SCOPES)."""
  from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

  q = quantizer.Quantizer(bytearray(flatbuffer))
  if variant == "fp16":
    q.add_weight_only_config(
      regex=".*",
      operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
      num_bits=16,
      algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
    )
  elif variant == "int8":
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    for scope, op_name in _large_multidim_weight_ops(flatbuffer):
      q.update_quantization_recipe(
        regex=f"^{re.escape(scope)}$",
        operation_name=op_name,
        algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
      )
  elif variant == "int8_static":
    if not calibration:
      raise ValueError(f"{name}: LiteRT {variant} needs calibration inputs")
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    _keep_float(q, flatbuffer, STATIC_FLOAT_SCOPES if float_scopes is None else float_scopes)
    qsvs = q.calibrate({"serving_default": calibration}, num_threads=len(os.sched_getaffinity(0)))
    return bytes(q.quantize(qsvs, enable_progress_report=False).quantized_model)
  else:
    raise ValueError(f"{name}: LiteRT variant {variant!r}: expected one of {VARIANTS[1:]}")
  return bytes(q.quantize().quantized_model)


def _keep_float(q, flatbuffer: bytes, scopes) -> None:
  """Leaves the ops in `scopes` (and those with over-32-MiB weights) unquantized."""
  from ai_edge_quantizer import algorithm_manager, qtyping

  # Float inputs and outputs (quantize and dequantize ops inside the model): the app feeds token
  # ids and Gaussian noise and reads a [0, 1] image, whatever the model computes in.
  for op_name in ("INPUT", "OUTPUT", *STATIC_FLOAT_OPS):
    q.update_quantization_recipe(
      regex=".*",
      operation_name=getattr(qtyping.TFLOperationName, op_name),
      algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
    )
  for scope in scopes:
    q.update_quantization_recipe(
      regex=scope,
      operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
      algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
    )
  for scope, op_name in _large_multidim_weight_ops(flatbuffer):
    q.update_quantization_recipe(
      regex=f"^{re.escape(scope)}$",
      operation_name=op_name,
      algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
    )


def _large_multidim_weight_ops(flatbuffer: bytes) -> list[tuple[str, str]]:
  """(scope, TFLite op name) of ops whose constant weight is > 2-D and over 32 MiB.

  ai-edge-quantizer 0.10 quantizes such weights in chunks along a flattened last axis and cannot
  broadcast per-channel (or per-tensor) scales onto them: a ValueError on the full-size UNet's
  3×3×1024² convolution. Those few ops keep float32 weights in the int8 model.
  """
  from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb_utils

  model = fb_utils.read_model(bytearray(flatbuffer))
  found = []
  for subgraph in model.subgraphs:
    for op in subgraph.operators:
      op_name = fb_utils.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
      weights = [
        fb_utils.get_tensor_data(subgraph.tensors[i], model.buffers) for i in op.inputs if i >= 0
      ]
      if op_name and any(
        w is not None and w.ndim > 2 and w.nbytes > _QUANTIZER_CHUNK_BYTES for w in weights
      ):
        found.append((fb_utils.get_op_scope(op, subgraph.tensors), op_name))
  return found


class Runner:
  """One `.tflite` in the LiteRT interpreter (XNNPACK on CPU, every core), called by name."""

  def __init__(self, path, num_threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads or os.cpu_count())
    self._run = self._interpreter.get_signature_runner("serving_default")

  def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return self._run(**inputs)

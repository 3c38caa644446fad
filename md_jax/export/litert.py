"""StableHLO → LiteRT `.tflite` (litert-converter, no TensorFlow), its fp16 and int8 variants
(ai-edge-quantizer), and running them in the LiteRT interpreter.

Variants, as a mobile engineer picks them:
  fp32  the converted graph as is.
  fp16  weights stored as float16 and dequantized to float32 at load (half the file; float math).
  int8  dynamic-range: weights int8 per output channel, activations quantized on the fly so
        convolutions and matmuls run in int8 (a quarter of the file; the error is reported).
"""

import contextlib
import os
import re

import numpy as np

VARIANTS = ("fp32", "fp16", "int8")
_QUANTIZER_CHUNK_BYTES = 32 * 1024 * 1024


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


def quantize(flatbuffer: bytes, variant: str, *, name: str) -> bytes:
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
  else:
    raise ValueError(f"{name}: LiteRT variant {variant!r}: expected one of {VARIANTS[1:]}")
  return bytes(q.quantize().quantized_model)


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

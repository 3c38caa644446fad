r"""Per-layer error of a quantized LiteRT artifact against its fp32 one: which ops break it.

  python -m md_jax.export.quant_report EXPORT_DIR/one_step_b1 [--variant=int8_static] \
      [--samples=8] [--top=25]

Both models run on the same inputs (`calibration.calibration_inputs` with another seed than the
export calibrated on: real training captions, noise, timesteps; the reference inputs when the
manifest names no checkpoint) with every intermediate tensor kept; each op's output is compared
by name. Per op: `rel` = rms(ŷ − y) / rms(y) of its output over the samples, and `added` = rel
minus the largest rel of its inputs, the error the op itself introduces (quantizing its output or
weights), which is what points at a sensitive layer: error carried in from upstream is not its
fault. `dtype`: the op's output type in the quantized model (float32: an op left in float, whose
`added` is only how it amplifies its inputs' error, e.g. x² doubles it; `--only_quantized` ranks
the int8 / int16 ops alone). Prints the `--top` ops by `added`, then one JSON line (`summary`).
"""

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 7: "int16", 9: "int8"}


def define_flags():
  flags.DEFINE_string("variant", "int8_static", "The quantized file: <variant>.tflite.")
  flags.DEFINE_integer("samples", 8, "Inputs to compare on.")
  flags.DEFINE_integer("top", 25, "Rows of the table.")
  flags.DEFINE_bool("only_quantized", False, "Rank only ops whose output is quantized.")


def _ops(model_bytes: bytes) -> list[dict]:
  """The main subgraph's ops: index, type, input and output tensor names, output dtype."""
  from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb_utils

  model = fb_utils.read_model(bytearray(model_bytes))
  graph = model.subgraphs[0]
  name = lambda i: graph.tensors[i].name.decode() if isinstance(graph.tensors[i].name, bytes) \
    else graph.tensors[i].name  # fmt: skip
  ops = []
  for index, op in enumerate(graph.operators):
    code = model.operatorCodes[op.opcodeIndex]
    kind = fb_utils.TFL_OP_CODE_TO_NAME.get(max(code.builtinCode, code.deprecatedBuiltinCode))
    ops.append({
      "index": index, "op": getattr(kind, "value", str(kind or code.builtinCode)),
      "inputs": [name(i) for i in op.inputs if i >= 0],
      "outputs": [name(i) for i in op.outputs if i >= 0],
      "dtype": _TYPES.get(graph.tensors[op.outputs[0]].type, "other") if len(op.outputs) else "",
    })  # fmt: skip
  return ops


def _all_tensors(model_bytes: bytes, inputs: dict) -> dict[str, np.ndarray]:
  """Every float or dequantized tensor of the main subgraph after one run, by name."""
  from ai_edge_quantizer.utils import tfl_interpreter_utils as utils

  interpreter = utils.create_tfl_interpreter(
    tflite_model=model_bytes, use_xnnpack=True, num_threads=1, preserve_all_tensors=True
  )
  utils.invoke_interpreter_signature(interpreter, inputs, "serving_default")
  graph = utils.get_signature_main_subgraph_index(interpreter, "serving_default")
  found = {}
  for tensor_name, detail in utils.get_tensor_name_to_details_map(interpreter, graph).items():
    if detail["dtype"] == np.object_ or not np.all(detail["shape"]):
      continue
    data = utils.get_tensor_data(interpreter, detail, graph)
    if np.issubdtype(data.dtype, np.floating):
      found[tensor_name] = np.asarray(data, np.float64)
  return found


def layer_errors(fp32: bytes, quantized: bytes, samples: list[dict]) -> list[dict]:
  """One row per fp32 op whose float output the quantized model also has (see the module doc)."""
  err = {}  # tensor name → [sum (ŷ − y)², sum y²]
  for inputs in samples:
    reference, target = _all_tensors(fp32, inputs), _all_tensors(quantized, inputs)
    for tensor_name, y in reference.items():
      if tensor_name in target and target[tensor_name].shape == y.shape:
        acc = err.setdefault(tensor_name, [0.0, 0.0])
        acc[0] += float(((target[tensor_name] - y) ** 2).sum())
        acc[1] += float((y**2).sum())
  rel = {k: np.sqrt(d / max(n, 1e-30)) for k, (d, n) in err.items()}
  dtypes = {t: op["dtype"] for op in _ops(quantized) for t in op["outputs"]}
  rows = []
  for op in _ops(fp32):
    out = [rel[t] for t in op["outputs"] if t in rel]
    if not out:
      continue
    upstream = max([rel[t] for t in op["inputs"] if t in rel] or [0.0])
    rows.append({
      "index": op["index"], "op": op["op"], "output": op["outputs"][0],
      "dtype": dtypes.get(op["outputs"][0], "float32"),
      "rel": float(max(out)), "added": float(max(out) - upstream),
    })  # fmt: skip
  return rows


def report_inputs(directory: pathlib.Path, num: int) -> list[dict]:
  """Calibration-style inputs (seed 1) from the manifest's checkpoint, else the reference's."""
  from md_jax.export import calibration, manifest, programs

  entry = next(
    (e for e in manifest.read(directory.parent)["artifacts"] if e["name"] == directory.name), None
  )
  if entry is None:
    raise ValueError(f"{directory}: not a program of {directory.parent / manifest.NAME}")
  checkpoint = manifest.read(directory.parent).get("source", {}).get("checkpoint")
  if checkpoint:
    source = programs.source_from_checkpoint(checkpoint)
    (program,) = programs.build_programs(source, (entry["program"],), (entry["batch"],))
    return calibration.calibration_inputs(program, source, num, seed=1)
  reference = np.load(directory / "reference.npz")
  return [{k[len("input/") :]: reference[k] for k in reference.files if k.startswith("input/")}]


def summary(rows: list[dict], output_rel: float, top: int, only_quantized: bool = False) -> dict:
  ranked = [r for r in rows if r["dtype"] in ("int8", "int16")] if only_quantized else rows
  worst = sorted(ranked, key=lambda r: -r["added"])[:top]
  quantized = sum(r["dtype"] in ("int8", "int16") for r in rows)
  return {"output_rel_rms": output_rel, "ops": len(rows), "quantized_ops": quantized,
          "worst": worst}  # fmt: skip


def print_table(result: dict) -> None:
  print(f"{'index':>5}  {'op':<16} {'dtype':<8} {'added':>7} {'rel':>7}  output tensor")
  for r in result["worst"]:
    print(f"{r['index']:>5}  {r['op']:<16} {r['dtype']:<8} {r['added']:>7.4f} {r['rel']:>7.4f}  "
          f"{r['output'][:80]}")  # fmt: skip
  print(f"output rel rms error {result['output_rel_rms']:.4f}; {result['quantized_ops']} of "
        f"{result['ops']} ops quantized")  # fmt: skip
  print(json.dumps(result))


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("give one program directory: EXPORT_DIR/<program>_b<N>")
  directory = pathlib.Path(argv[1])
  files = [directory / "fp32.tflite", directory / f"{FLAGS.variant}.tflite"]
  for file in files:
    if not file.is_file():
      raise FileNotFoundError(f"{file}: no such file (export it with --formats=litert_fp32,...)")
  fp32, quantized = (f.read_bytes() for f in files)
  samples = report_inputs(directory, FLAGS.samples)
  rows = layer_errors(fp32, quantized, samples)
  from ai_edge_quantizer.utils import tfl_interpreter_utils as utils

  outputs = utils.get_output_tensor_names(fp32, "serving_default")
  output_rel = max([r["rel"] for r in rows if r["output"] in outputs] or [float("nan")])
  print_table(summary(rows, output_rel, FLAGS.top, FLAGS.only_quantized))


if __name__ == "__main__":
  define_flags()
  from md_jax import cli_errors

  cli_errors.run(main, log_dir=lambda: [sys.argv[1] if len(sys.argv) > 1 else None])

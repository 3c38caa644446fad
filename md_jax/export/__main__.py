r"""Exports a trained model for phones: StableHLO, LiteRT and IREE artifacts plus a manifest.

  python -m md_jax.export --workdir=workdirs/main --out=export/main [--batch=1,2] \
      [--programs=text_encoder,unet,decoder,one_step] [--formats=litert_fp32,...,iree_host]
  python -m md_jax.export --workdir=... --formats=litert_int8_static --calibration_samples=256
  python -m md_jax.export --checkpoint=workdirs/main/ufogen/checkpoints/400 --out=...
  python -m md_jax.export --workdir=workdirs/main/ufogen --out=... --programs=one_step_control \
      --plugin=workdirs/plugin --lora=concept.safetensors:0.8 --batch=1
  python -m md_jax.export --config=configs/mobilediffusion.py --out=export/full --resolution=512
  python -m md_jax.export.verify export/main

`--workdir` takes a stage's workdir (its latest checkpoint) or a main-job workdir (its `ufogen`
stage when finished, else `diffusion`). `--config` exports random-initialised weights at the
config's size (with `--vae_config`'s light decoder): the full-size model has no trained checkpoint
here, and size, conversion, parity and latency do not depend on the weights. See
`md_jax/export/bundle.py` for the directory layout and `programs.py` for what each program takes.
`--lora` merges LoRA files into the UNet first; `--plugin` adds the `one_step_control` program,
whose third input is the plugin's condition map (`attachments.py`).
A bad flag, path or checkpoint ends with one line `FATAL <message>`, the traceback in `error.log`
in `--out` or `--workdir`, where one exists (`--verbose`: on stderr; `md_jax/cli_errors.py`).
"""

import os
import pathlib

from absl import app, flags, logging

from md_jax import cli_errors

FLAGS = flags.FLAGS
_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
MAIN_JOB_STAGES = ("ufogen", "diffusion")  # a main-job workdir exports the first finished one


def define_flags():
  from md_jax.export import bundle, programs

  flags.DEFINE_string("workdir", None, "A stage's or a main job's workdir.")
  flags.DEFINE_string("checkpoint", None, "One checkpoint directory.")
  flags.DEFINE_string("config", None, "A diffusion config: random-initialised weights at its size.")
  flags.DEFINE_string("vae_config", str(_CONFIGS / "models" / "vae.py"), "With --config.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_list("batch", ["1", "2"], "Fixed batch sizes (2: classifier-free guidance).")
  flags.DEFINE_list(
    "programs",
    None,
    f"Which of {[*programs.PROGRAMS, programs.CONTROL_PROGRAM]} ({programs.CONTROL_PROGRAM}: with "
    "--plugin); default: all the checkpoint (and plugin) has.",
  )
  flags.DEFINE_list(
    "formats", list(bundle.FORMATS),
    f"Conversions besides StableHLO, of {list(bundle.ALL_FORMATS)}; "
    f"{list(bundle.CALIBRATED_FORMATS)} only when named (calibrated on the data).",
  )  # fmt: skip
  flags.DEFINE_integer(
    "calibration_samples", bundle.DEFAULT_CALIBRATION_SAMPLES,
    "Inputs (real captions, noise, timesteps) that litert_int8_static calibrates on.",
  )  # fmt: skip
  flags.DEFINE_integer("resolution", None, "Image size; default: the checkpoint's final phase.")
  flags.DEFINE_multi_string(
    "lora", None, "FILE[:scale]: a LoRA merged into the UNet before export (repeatable)."
  )
  flags.DEFINE_string(
    "plugin", None, "A control plugin run: adds the one_step_control program (condition input)."
  )
  cli_errors.define_verbose_flag()


def resolve_workdir(workdir: str) -> str:
  from md_jax.infra import checkpoints

  path = pathlib.Path(workdir)
  if (path / "checkpoints").exists() or not path.exists():
    return workdir  # a stage's workdir (or a missing path: resolve_checkpoint says so)
  for stage in MAIN_JOB_STAGES:
    if checkpoints.completed_step(path / stage) is not None:
      return str(path / stage)
  raise FileNotFoundError(
    f"--workdir={workdir!r} has no checkpoints/ and no finished {' or '.join(MAIN_JOB_STAGES)} "
    "stage"
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if sum(bool(x) for x in (FLAGS.workdir, FLAGS.checkpoint, FLAGS.config)) != 1:
    raise app.UsageError("give exactly one of --workdir, --checkpoint and --config")
  if not FLAGS.out:
    raise app.UsageError("give --out")
  try:
    batches = [int(b) for b in FLAGS.batch]
  except ValueError:
    raise app.UsageError(f"--batch={','.join(FLAGS.batch)}: expected integers") from None
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from md_jax.config_utils import load_config
  from md_jax.export import attachments, bundle, calibration, programs

  if set(FLAGS.formats) & set(bundle.CALIBRATED_FORMATS):  # before minutes of loading
    calibration.check_num_samples(FLAGS.calibration_samples)

  logging.set_verbosity(logging.INFO)
  if FLAGS.config:
    for name in ("config", "vae_config"):
      file = FLAGS[name].value.split(":", 1)[0]
      if not os.path.exists(file):
        raise FileNotFoundError(f"--{name}={FLAGS[name].value}: no such config file")
    source = programs.source_from_config(
      load_config(FLAGS.config), load_config(FLAGS.vae_config), FLAGS.resolution or 512
    )
  else:
    checkpoint = FLAGS.checkpoint or resolve_workdir(FLAGS.workdir)
    what = "--checkpoint" if FLAGS.checkpoint else "--workdir"
    source = programs.source_from_checkpoint(checkpoint, what, FLAGS.resolution)
  if FLAGS.lora:
    from md_jax.generate import parse_lora_flag

    source = attachments.with_loras(source, [parse_lora_flag(v) for v in FLAGS.lora])
  if FLAGS.plugin:
    source = attachments.with_plugin(source, FLAGS.plugin)
  result = bundle.export_all(
    source,
    FLAGS.out,
    kinds=FLAGS.programs or source.kinds,
    batches=batches,
    formats=FLAGS.formats,
    calibration_samples=FLAGS.calibration_samples,
  )
  print(f"wrote {len(result['artifacts'])} artifacts and manifest.json to {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  cli_errors.run(main, log_dir=lambda: [FLAGS.out, FLAGS.workdir])

r"""The main job's applications figures (issue 42) for any main-job workdir and modules.

  python -m md_jax.benchmarks.applications_eval --workdir=workdirs/main \
      [--plugin=RUN] [--lora=FILE] [--inpaint_plugin=RUN] [--num_images=256] \
      [--num_concept=128] [--teacher_steps=50] [--grid=applications.png]

What `configs/main.py`'s job reports in `eval.json`'s "applications"
(`evaluation/applications.py`): the control plugin's edge F1 and attribute accuracy with the
50-step teacher and the one-step generator, with and without it; the LoRA's concept rate in one
step and its accuracy cost; one-step inpainting, training-free and (with `--inpaint_plugin`)
trained. A module defaults to the workdir's own stage (`plugin`, `lora/lora.safetensors`,
`inpaint_plugin`) and is left out when absent. The last line is one JSON object.
"""

import json
import os
import pathlib
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A main job's workdir (diffusion, ufogen, classifier).")
  flags.DEFINE_string("plugin", None, "A canny plugin run (default: <workdir>/plugin).")
  flags.DEFINE_string("lora", None, "A LoRA file (default: <workdir>/lora/lora.safetensors).")
  flags.DEFINE_string(
    "inpaint_plugin", None, "An inpaint plugin (default <workdir>/inpaint_plugin)."
  )
  flags.DEFINE_integer("num_images", 256, "Validation scenes (control, accuracy, inpainting).")
  flags.DEFINE_integer("num_concept", 128, "Held-out concept prompts for the LoRA.")
  flags.DEFINE_integer("teacher_steps", 50, "The teacher's DDIM steps (CFG 3).")
  flags.DEFINE_string("grid", None, "PNG: condition | teacher | one-step, four rows a module.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from md_jax import config_utils
  from md_jax.benchmarks import timing
  from md_jax.evaluation import applications

  workdir = pathlib.Path(FLAGS.workdir)
  main_config = config_utils.load_config(str(pathlib.Path(__file__).parents[2] / "configs/main.py"))
  settings = main_config.applications
  settings.num_images, settings.num_concept = FLAGS.num_images, FLAGS.num_concept
  settings.teacher.steps = FLAGS.teacher_steps
  # A module is a flag's path or the workdir's own stage (`workdir / absolute` is the absolute
  # path); `stages` holds the ones there are.
  chosen = {"control": FLAGS.plugin, "inpainting": FLAGS.inpaint_plugin}
  stages = ["diffusion", "ufogen"]
  for key, path in chosen.items():
    if path:
      settings[key] = os.path.abspath(path)
    if (workdir / settings[key]).exists():
      stages.append(settings[key])
  lora = FLAGS.lora or str(workdir / "lora/lora.safetensors")
  if os.path.exists(lora):
    stages.append(settings.lora)
  try:
    result = applications.evaluate(
      settings, workdir, workdir / main_config.evaluator, stages=tuple(stages),
      lora_path=lora, grid=FLAGS.grid,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  print(json.dumps({**timing.machine(), "workdir": str(workdir), **result}))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

r"""Steps against quality for every sampler of a main job (issue 43, item 2).

  python -m md_jax.benchmarks.steps_curve --workdir=JOB [--out=JOB/steps_curve] \
      [--only=teacher,student,ufogen] [--steps=1,2,4,8,16,50] [--cfg=3.0] [--num_images=512] \
      [--batch_size=32] [--seed=0]

Scores, on held-out captions with the main job's classifier (`JOB/shapes_classifier`,
`md_jax.evaluation.shapes_eval.evaluate`):
  teacher  `JOB/diffusion`, DDIM and DPM-Solver++ at each of --steps, CFG at --cfg;
  student  `JOB/step_distill`, each progressive-distillation round's checkpoint at its own step
           count (`student_rounds`), DDIM at --cfg (guidance is folded into the student);
  ufogen   `JOB/ufogen`, 1, 2 and 4 generator steps, no guidance.
A stage without a complete checkpoint is skipped with one line. Each row has the UNet calls per
image, attribute accuracy, Fréchet distance and latency per image (1000 / images/s, compilation
excluded). Prints a markdown table and the student's 8-step latency ÷ the teacher's 50-step
DDIM + CFG latency; writes `steps_curve.json` (every row) and `steps_curve.png` (accuracy against
steps, Fréchet distance against latency) to --out. The last line is one JSON object.
"""

import dataclasses
import json
import math
import os
import pathlib
import sys

from absl import app, flags

GROUPS = ("teacher", "student", "ufogen")
TEACHER_STEPS = (1, 2, 4, 8, 16, 50)
TEACHER_SAMPLERS = ("ddim", "dpm++")
UFOGEN_STEPS = (1, 2, 4)
# The stage directory under the job each group reads.
STAGE_DIRS = {"teacher": "diffusion", "student": "step_distill", "ufogen": "ufogen"}
RATIO_KEY = "student_8_over_teacher_ddim_50_latency"


@dataclasses.dataclass(frozen=True)
class Run:
  """One evaluation: which model, sampled how, from which checkpoint."""

  model: str  # one of GROUPS
  sampler: str
  steps: int
  cfg: float
  checkpoint: pathlib.Path
  folded_guidance: bool = False  # a guidance-conditioned student: the scale is its input


def calls_per_image(
  model: str, sampler: str, steps: int, cfg: float, folded_guidance: bool = False
) -> int:
  """UNet forwards per image. A plain UNet under classifier-free guidance runs the conditional
  and unconditional halves each step (the teacher; a "cfg_aware" student); a student with
  guidance folded in (`model.guidance_embedding`) and the UFOGen generator run one per step."""
  guided = model != "ufogen" and sampler in TEACHER_SAMPLERS and cfg != 1.0 and not folded_guidance
  return steps * (2 if guided else 1)


def student_rounds(job) -> list[tuple[int, pathlib.Path]]:
  """(sampling steps, checkpoint directory) of each distillation round whose checkpoint is
  complete. Round r (0-based) is phase r of the step_distill run; its student samples in
  `teacher_steps // 2**(r+1)` steps and is saved at that phase's end step."""
  import ml_collections

  from md_jax.infra import checkpoints, phases

  run = pathlib.Path(job) / STAGE_DIRS["student"]
  config = ml_collections.ConfigDict(checkpoints.saved_config(str(run)))
  teacher_steps = int(config.step_distill.teacher_steps)
  rounds = []
  for r, phase in enumerate(phases.phases_from_config(config)):
    steps = teacher_steps // 2 ** (r + 1)
    checkpoint = run / "checkpoints" / str(phase.end_step)
    if steps < 1:  # more rounds than teacher_steps can halve: nothing to sample with
      print(f"student round {r}: teacher_steps={teacher_steps} leaves no steps, skipped")
    elif not (checkpoint / "state").exists():  # not written yet, or still being written
      print(f"student round {r} ({steps} steps): no complete checkpoint at {checkpoint}, skipped")
    else:
      rounds.append((steps, checkpoint))
  return rounds


def _student_folds_guidance(job) -> bool:
  """Whether the step_distill run's student takes the guidance scale as input (one call per
  step) rather than being read through CFG (`step_distill.mode="cfg_aware"`)."""
  from md_jax.infra import checkpoints

  config = checkpoints.saved_config(str(pathlib.Path(job) / STAGE_DIRS["student"]))
  return bool(config["model"].get("guidance_embedding", False))


def _stage_ready(job: pathlib.Path, group: str) -> bool:
  """Whether the group's stage has a complete checkpoint; prints the one skip line if not."""
  from md_jax.infra import checkpoints

  stage = job / STAGE_DIRS[group]
  if not stage.exists():
    print(f"{group}: skipped, {stage} does not exist")
    return False
  if checkpoints.completed_step(stage) is None:
    print(f"{group}: skipped, {stage} holds no complete checkpoint yet")
    return False
  return True


def planned_runs(job, groups=GROUPS, teacher_steps=TEACHER_STEPS, cfg=3.0) -> list[Run]:
  """Every evaluation of the asked groups whose stage is there, in the order they run."""
  job = pathlib.Path(job)
  runs = []
  if "teacher" in groups and _stage_ready(job, "teacher"):
    runs += [
      Run("teacher", sampler, steps, cfg, job / STAGE_DIRS["teacher"])
      for sampler in TEACHER_SAMPLERS
      for steps in teacher_steps
    ]
  if "student" in groups and _stage_ready(job, "student"):
    folded = _student_folds_guidance(job)
    runs += [
      Run("student", "ddim", steps, cfg, path, folded) for steps, path in student_rounds(job)
    ]
  if "ufogen" in groups and _stage_ready(job, "ufogen"):
    runs += [
      Run("ufogen", "ufogen", steps, 1.0, job / STAGE_DIRS["ufogen"]) for steps in UFOGEN_STEPS
    ]
  return runs


def make_row(run: Run, result: dict) -> dict:
  """A table row from `shapes_eval.evaluate`'s result. Latency is None when nothing was timed
  (one batch only: it pays for compilation), so the JSON stays valid."""
  images_per_s = result["images_per_s"]
  timed = images_per_s > 0 and math.isfinite(images_per_s)
  return {
    "model": run.model,
    "sampler": run.sampler,
    "steps": run.steps,
    "cfg": run.cfg,
    "unet_calls_per_image": calls_per_image(
      run.model, run.sampler, run.steps, run.cfg, run.folded_guidance
    ),
    "overall_accuracy": result["overall_accuracy"],
    "frechet_distance": result["frechet_distance"],
    "latency_ms_per_image": 1000.0 / images_per_s if timed else None,
    "images_per_s": images_per_s if timed else None,
    "checkpoint": str(run.checkpoint),
    "checkpoint_step": result["checkpoint_step"],
    "num_images": result["num_images"],
  }


def latency_ratio(rows) -> float | None:
  """The student's 8-step latency ÷ the teacher's 50-step DDIM + CFG latency; None unless both
  rows exist and were timed."""
  student = teacher = None
  for row in rows:
    if (row["model"], row["steps"]) == ("student", 8):
      student = row["latency_ms_per_image"]
    elif (row["model"], row["sampler"], row["steps"]) == ("teacher", "ddim", 50) and row[
      "cfg"
    ] != 1:
      teacher = row["latency_ms_per_image"]
  return student / teacher if student is not None and teacher is not None else None


def markdown_table(rows) -> str:
  def number(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"

  lines = [
    "| model | sampler | steps | cfg | UNet calls/image | accuracy | Fréchet | ms/image |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['cfg']:g} | "
      f"{r['unet_calls_per_image']} | {r['overall_accuracy']:.3f} | "
      f"{r['frechet_distance']:.3f} | {number(r['latency_ms_per_image'], 1)} |"
    )
  return "\n".join(lines)


def plot(rows, path) -> None:
  """Two panels, one line per (model, sampler): accuracy against steps, Fréchet distance against
  latency. Both x axes are logarithmic: steps run 1 to 50 and latencies span orders of magnitude,
  so on a linear axis the few-step points would sit on top of each other."""
  from matplotlib import ticker
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  # A Figure on the Agg canvas directly, not pyplot: no global state, no display backend.
  figure = Figure(figsize=(11, 4.5), layout="constrained")
  FigureCanvasAgg(figure)
  by_steps, by_latency = figure.subplots(1, 2)
  lines = {}
  for row in rows:
    lines.setdefault((row["model"], row["sampler"]), []).append(row)
  for (model, sampler), line in lines.items():
    label = f"{model} ({sampler})"
    line = sorted(line, key=lambda r: r["steps"])
    by_steps.plot([r["steps"] for r in line], [r["overall_accuracy"] for r in line], "o-",
                  label=label)  # fmt: skip
    timed = sorted((r for r in line if r["latency_ms_per_image"]),
                   key=lambda r: r["latency_ms_per_image"])  # fmt: skip
    by_latency.plot([r["latency_ms_per_image"] for r in timed],
                    [r["frechet_distance"] for r in timed], "o-", label=label)  # fmt: skip
  by_steps.set(xscale="log", xlabel="sampling steps", ylabel="attribute accuracy",
               title="accuracy against steps")  # fmt: skip
  # The step counts themselves as ticks: "1 2 4 8 16 50" reads better than powers of ten.
  steps = sorted({r["steps"] for r in rows})
  by_steps.set_xticks(steps, [str(n) for n in steps])
  by_steps.minorticks_off()
  by_latency.set(xscale="log", xlabel="latency per image (ms)", ylabel="Fréchet distance",
                 title="Fréchet distance against latency")  # fmt: skip
  # Plain numbers (10, 20, 100) rather than 2×10¹; after set(xscale=...), which resets them.
  by_latency.xaxis.set_major_formatter(ticker.LogFormatter())
  by_latency.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
  for axes in (by_steps, by_latency):
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
  figure.savefig(path, dpi=120)


def summary(rows, **settings) -> dict:
  from md_jax.benchmarks import timing

  return {
    **timing.machine(),
    "cpu_count": os.cpu_count(),
    **settings,
    RATIO_KEY: latency_ratio(rows),
    "rows": rows,
  }


def define_flags():
  flags.DEFINE_string("workdir", None, "A main job's workdir (diffusion, step_distill, ufogen, "
                      "shapes_classifier).")  # fmt: skip
  flags.DEFINE_string("out", None, "Where the JSON and plot go (default <workdir>/steps_curve).")
  flags.DEFINE_list("only", list(GROUPS), f"Which of {GROUPS} to score.")
  flags.DEFINE_list("steps", [str(s) for s in TEACHER_STEPS], "The teacher's step counts.")
  flags.DEFINE_float("cfg", 3.0, "Guidance scale of the teacher and student (UFOGen takes none).")
  flags.DEFINE_integer("num_images", 512, "Held-out captions scored per row.")
  flags.DEFINE_integer("batch_size", 32, "Images per generation batch (the first is not timed).")
  flags.DEFINE_integer("seed", 0, "Seed of the initial noise.")
  flags.mark_flag_as_required("workdir")


def run_curve(
  job, out, *, groups=GROUPS, teacher_steps=TEACHER_STEPS, cfg=3.0, num_images=512,
  batch_size=32, seed=0, evaluate=None,
) -> dict:  # fmt: skip
  """Scores every planned row, writes the JSON and plot to `out`, prints the table; returns the
  summary. `evaluate`: `shapes_eval.evaluate` unless given (tests pass a stand-in)."""
  if evaluate is None:
    from md_jax.evaluation.shapes_eval import evaluate
  job, out = pathlib.Path(job), pathlib.Path(out)
  classifier = job / "shapes_classifier"
  if not classifier.exists():
    raise FileNotFoundError(
      f"{classifier} does not exist: the evaluator needs the job's classifier"
    )
  runs = planned_runs(job, groups, teacher_steps, cfg)
  out.mkdir(parents=True, exist_ok=True)
  settings = {"workdir": str(job), "num_images": num_images, "cfg": cfg, "seed": seed}
  rows = []
  for i, run in enumerate(runs):
    result = evaluate(
      str(run.checkpoint), str(classifier), sampler=run.sampler, steps=run.steps, cfg=run.cfg,
      num_images=num_images, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    rows.append(make_row(run, result))
    print(f"[{i + 1}/{len(runs)}] {json.dumps(rows[-1])}", flush=True)
    # Rewritten after every row: a run of many minutes that stops still leaves its rows.
    (out / "steps_curve.json").write_text(json.dumps(summary(rows, **settings), indent=1) + "\n")
  if rows:
    plot(rows, out / "steps_curve.png")
  result = summary(rows, **settings)
  (out / "steps_curve.json").write_text(json.dumps(result, indent=1) + "\n")
  print(markdown_table(rows))
  ratio = result[RATIO_KEY]
  print("student 8-step latency ÷ teacher 50-step DDIM + CFG latency: "
        + (f"{ratio:.3f}" if ratio is not None else "n/a (needs both rows, timed)"))  # fmt: skip
  print(f"wrote {out / 'steps_curve.json'}" + (f" and {out / 'steps_curve.png'}" if rows else ""))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  FLAGS = flags.FLAGS
  unknown = sorted(set(FLAGS.only) - set(GROUPS))
  if unknown:
    raise app.UsageError(f"--only: unknown {unknown}; expected some of {GROUPS}")
  try:
    teacher_steps = [int(s) for s in FLAGS.steps]
  except ValueError as e:
    raise app.UsageError(f"--steps: {e}") from None
  if any(s < 1 for s in teacher_steps):
    raise app.UsageError(f"--steps: every step count must be ≥ 1, got {teacher_steps}")
  job = pathlib.Path(FLAGS.workdir)
  try:
    result = run_curve(
      job, FLAGS.out or job / "steps_curve", groups=FLAGS.only, teacher_steps=teacher_steps,
      cfg=FLAGS.cfg, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

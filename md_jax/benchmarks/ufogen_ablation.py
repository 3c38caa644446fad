r"""UFOGen's Table 5 on `shapes`: each objective × (full, LoRA), same budget, one-step scores.

  python -m md_jax.benchmarks.ufogen_ablation --workdir=workdirs/main [--steps=200] \
      [--out=workdirs/ufogen_ablation] [--num_images=512]

Starts every variant from the main job's diffusion run (`<workdir>/diffusion`) with the main job's
`ufogen` stage config (`configs/main.py`: its jump, learning rates, D and classifier term, whose
classifier is `<workdir>/latent_classifier`; the run's model, text encoder and latents
inherited), trains it for `--steps` at the same batch, learning rates and seed, then scores G's
one-step samples with the main job's classifier (`<workdir>/shapes_classifier`): attribute
accuracy and Fréchet distance on held-out captions, beside the 50-step DDIM + CFG teacher's. A
variant whose final checkpoint exists is not retrained. Prints a table with the paper's FIDs
(lower is better) and whether the orderings agree; the last line is one JSON object.
"""

import json
import pathlib
import time

from absl import app, flags, logging

from md_jax.benchmarks import timing

# Paper Table 5: FID of each reconstruction loss, full finetuning vs LoRA.
PAPER_FID = {
  ("diffusion", "full"): 11.67,
  ("diffusion", "lora"): 13.45,
  ("distill", "full"): 11.20,
  ("distill", "lora"): 13.24,
  ("ema_distill", "full"): 12.08,
  ("ema_distill", "lora"): 14.05,
}
_REPO = pathlib.Path(__file__).resolve().parents[2]


def define_flags():
  flags.DEFINE_string(
    "workdir", None, "The main job's workdir (diffusion, latent_classifier, shapes_classifier)."
  )
  flags.DEFINE_string("out", None, "Where the variants train (default <workdir>/ufogen_ablation).")
  flags.DEFINE_integer("steps", 200, "Training steps per variant.")
  flags.DEFINE_integer("lora_rank", 4, "Rank of the LoRA variants.")
  flags.DEFINE_integer("num_images", 512, "Held-out captions scored per variant.")
  flags.mark_flag_as_required("workdir")


def variant_config(diffusion_config, objective: str, lora_rank: int, steps: int, workdir):
  """The main job's `ufogen` stage (its jump, learning rates, D and classifier term, the latter
  read from `<workdir>/latent_classifier`), on the given diffusion run."""
  from md_jax.config_utils import inherit_from_diffusion, load_config
  from md_jax.main_job import resolve_workdir

  job_stage = resolve_workdir(load_config(_REPO / "configs/main.py").stages.ufogen, workdir)
  config = inherit_from_diffusion(job_stage, diffusion_config)
  config.data.label_keys = job_stage.data.label_keys  # the classifier term's labels
  config.ufogen.objective = objective
  config.ufogen.lora.rank = lora_rank
  config.num_train_steps = steps
  config.global_batch_size = 16
  config.checkpoint_every = steps
  config.sample_every = 0
  return config


def run_variant(config, workdir: pathlib.Path) -> float:
  """Trains (unless finished); returns the wall seconds spent."""
  from md_jax import config_utils
  from md_jax.infra import checkpoints
  from md_jax.training import trainer
  from md_jax.training.ufogen import UFOGenStage

  if (checkpoints.completed_step(workdir) or 0) >= config.num_train_steps:
    return 0.0
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config_utils.config_to_json(config) + "\n")
  start = time.perf_counter()
  trainer.train_and_evaluate(config, str(workdir), UFOGenStage(config))
  return time.perf_counter() - start


def _agreement(rows) -> dict:
  """The orderings Table 5 shows, checked on our scores (higher accuracy, lower distance)."""
  score = {(r["objective"], r["generator"]): r for r in rows}
  checks = {}
  for metric, better in (("overall_accuracy", max), ("frechet_distance", min)):
    full_beats_lora = [
      better(score[(o, "full")][metric], score[(o, "lora")][metric]) == score[(o, "full")][metric]
      for o in ("diffusion", "distill", "ema_distill")
    ]
    checks[f"full_beats_lora_{metric}"] = f"{sum(full_beats_lora)}/3"
    best_full = better(("diffusion", "distill", "ema_distill"),
                       key=lambda o: score[(o, "full")][metric])  # fmt: skip
    checks[f"best_full_objective_{metric}"] = best_full
  checks["paper"] = "full beats LoRA 3/3; best full objective: distill (then diffusion, EMA)"
  return checks


def main(argv):
  del argv
  import ml_collections

  from md_jax.evaluation import shapes_eval
  from md_jax.infra import checkpoints

  FLAGS = flags.FLAGS
  workdir = pathlib.Path(FLAGS.workdir)
  out = pathlib.Path(FLAGS.out or workdir / "ufogen_ablation")
  diffusion = str(workdir / "diffusion")
  classifier = str(workdir / "shapes_classifier")
  diffusion_config = ml_collections.ConfigDict(checkpoints.saved_config(diffusion, "--workdir"))
  evaluate = lambda path, sampler, steps, cfg: shapes_eval.evaluate(
    path, classifier, sampler=sampler, steps=steps, cfg=cfg, num_images=FLAGS.num_images
  )
  teacher = evaluate(diffusion, "ddim", 50, 3.0)
  rows = []
  for objective in ("diffusion", "distill", "ema_distill"):
    for generator, rank in (("full", 0), ("lora", FLAGS.lora_rank)):
      name = f"{objective}_{generator}"
      config = variant_config(diffusion_config, objective, rank, FLAGS.steps, workdir)
      config.init_checkpoint = diffusion
      seconds = run_variant(config, out / name)
      result = evaluate(str(out / name), "ufogen", 1, 1.0)
      rows.append({
        "objective": objective, "generator": generator, "train_minutes": round(seconds / 60, 2),
        "overall_accuracy": result["overall_accuracy"],
        "frechet_distance": result["frechet_distance"],
        "frechet_over_teacher": result["frechet_distance"] / teacher["frechet_distance"],
        "paper_fid": PAPER_FID[(objective, generator)],
      })  # fmt: skip
      logging.info("%s: %s", name, rows[-1])

  print(
    f"UFOGen ablation on shapes, {FLAGS.steps} steps each; teacher (50-step DDIM, CFG 3): "
    f"accuracy {teacher['overall_accuracy']:.3f}, Fréchet {teacher['frechet_distance']:.3f}"
  )
  print(
    f"{'objective':<12} {'G':<5} {'accuracy':>9} {'Fréchet':>8} {'×teacher':>9} {'paper FID':>10}"
  )
  for r in rows:
    print(
      f"{r['objective']:<12} {r['generator']:<5} {r['overall_accuracy']:>9.3f} "
      f"{r['frechet_distance']:>8.3f} {r['frechet_over_teacher']:>9.2f} {r['paper_fid']:>10.2f}"
    )
  result = {
    **timing.machine(),
    "steps": FLAGS.steps,
    "lora_rank": FLAGS.lora_rank,
    "num_images": FLAGS.num_images,
    "teacher_overall_accuracy": teacher["overall_accuracy"],
    "teacher_frechet_distance": teacher["frechet_distance"],
    "variants": rows,
    "agreement": _agreement(rows),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)

r"""Does a personalization LoRA draw its concept, and what does it cost the other attributes?
(issue 42's LoRA must-show.)

  python -m md_jax.benchmarks.lora_concept --workdir=workdirs/main/ufogen \
      --lora=workdirs/lora/lora.safetensors --sampler=ufogen --steps=1 --cfg=1 \
      [--num_concept=128 --concept_seed=1000] [--num_images=512] [--classifier=RUN] \
      [--grid=lora_grid.png]

`--workdir` is the model sampled (the base diffusion run, or its one-step UFOGen generator: the
LoRA, trained on the base, is merged into either). Two figures, each without and with the LoRA:
  (a) concept rate: the share of held-out concept prompts (`data/concept.py`: the LoRA's token
      in the kind's place, scenes from `--concept_seed`, not the training set's) whose image's
      largest shape reads as the concept (`evaluation/concept_eval.py`, OpenCV outlines);
  (b) the `shapes` evaluator's attribute accuracy on `--num_images` ordinary validation captions
      (`shapes_eval.evaluate`, the same images without and with the LoRA: same noise).
`--grid` writes the concept prompts' images, two columns per prompt: without | with the LoRA.
The last line is one JSON object.
"""

import json
import os
import pathlib
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def run(workdir, loras, *, sampler, steps, cfg, num_concept, concept_seed, num_images,
        classifier, batch_size=32, grid=None, grid_num=16, seed=0) -> dict:  # fmt: skip
  import numpy as np

  from md_jax import visualize
  from md_jax.evaluation import concept_eval, shapes_eval
  from md_jax.pipeline import lora_file
  from md_jax.pipeline.text_to_image import TextToImage

  loaded = [(lora_file.load_lora(path), scale) for path, scale in loras]
  if not loaded:
    raise ValueError("--lora: at least one LoRA file")
  info = loaded[0][0][1].get("info") or {}
  token, kind = info.get("token", "sks"), info.get("kind", "hexagon")
  pipeline, params, step, _ = TextToImage.from_checkpoint(workdir, what="--workdir")
  with_lora = lora_file.apply_to(params, loaded)
  prompts = concept_eval.concept_prompts(
    num_concept, seed=concept_seed, token=token, kind=kind, resolution=pipeline.resolution
  )
  kw = {"sampler": sampler, "steps": steps, "cfg": cfg, "seed": seed, "batch_size": batch_size}
  images = {
    name: concept_eval.generate_all(pipeline, p, prompts.captions, **kw)
    for name, p in (("without", params), ("with", with_lora))
  }
  result = {
    "workdir": str(workdir),
    "checkpoint_step": int(step),
    "loras": [lora_file.describe(manifest, s) for (_, manifest), s in loaded],
    "token": token,
    "kind": kind,
    "sampler": sampler,
    "steps": steps,
    "cfg": cfg,
    "num_concept": num_concept,
    "concept_seed": concept_seed,
    "concept_rate_without": concept_eval.concept_rate(images["without"], kind),
    "concept_rate_with": concept_eval.concept_rate(images["with"], kind),
    # The concept set's own renders, through the same detector: its ceiling.
    "concept_rate_rendered": concept_eval.concept_rate(prompts.images, kind),
  }
  if grid:
    n = min(grid_num, num_concept)
    pairs = np.stack([images["without"][:n], images["with"][:n]], axis=1).reshape(
      -1, *images["with"].shape[1:]
    )
    visualize.save_png(
      visualize.make_grid(pairs, columns=8), grid,
      text={"prompts": json.dumps(list(prompts.captions[:n])), "settings": json.dumps(kw)},
    )  # fmt: skip
    result["grid"] = str(grid)
  if num_images:
    for name, chosen in (("without", ()), ("with", loaded)):
      scored = shapes_eval.evaluate(
        workdir, classifier, sampler=sampler, steps=steps, cfg=cfg, num_images=num_images,
        batch_size=batch_size, seed=seed, loras=chosen,
      )  # fmt: skip
      result[f"accuracy_{name}"] = scored["accuracy"]
      result[f"overall_accuracy_{name}"] = scored["overall_accuracy"]
    result["num_images"] = num_images
    result["overall_accuracy_drop"] = (
      result["overall_accuracy_without"] - result["overall_accuracy_with"]
    )
  return result


def define_flags():
  flags.DEFINE_string("workdir", None, "The model sampled: a diffusion or ufogen run.")
  flags.DEFINE_multi_string("lora", None, "FILE[:scale], repeatable (merged together).")
  flags.DEFINE_enum("sampler", "ufogen", ["ddim", "dpm++", "ufogen"], "Sampler.")
  flags.DEFINE_integer("steps", 1, "Network evaluations per image.")
  flags.DEFINE_float("cfg", 1.0, "Classifier-free guidance scale (ddim, dpm++).")
  flags.DEFINE_integer("num_concept", 128, "Held-out concept prompts.")
  flags.DEFINE_integer("concept_seed", 1000, "Seed of the held-out concept scenes.")
  flags.DEFINE_integer("num_images", 512, "Ordinary validation captions scored (0: none).")
  flags.DEFINE_string("classifier", None, "A shapes_classifier run (default: beside --workdir).")
  flags.DEFINE_integer("batch_size", 32, "Images per generation batch.")
  flags.DEFINE_string("grid", None, "PNG of concept prompts: without | with the LoRA.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from md_jax.generate import parse_lora_flag

  classifier = FLAGS.classifier or str(pathlib.Path(FLAGS.workdir).parent / "shapes_classifier")
  try:
    result = run(
      FLAGS.workdir, [parse_lora_flag(v) for v in FLAGS.lora or ()], sampler=FLAGS.sampler,
      steps=FLAGS.steps, cfg=FLAGS.cfg, num_concept=FLAGS.num_concept,
      concept_seed=FLAGS.concept_seed, num_images=FLAGS.num_images, classifier=classifier,
      batch_size=FLAGS.batch_size, grid=FLAGS.grid,
    )  # fmt: skip
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"FATAL {e}")
  print(f"{result['sampler']} × {result['steps']}, cfg {result['cfg']}: concept "
        f"{result['kind']!r} drawn for {result['concept_rate_with']:.3f} of "
        f"{result['num_concept']} prompts with the LoRA, {result['concept_rate_without']:.3f} "
        "without")  # fmt: skip
  if "overall_accuracy_with" in result:
    print(f"  attribute accuracy ({result['num_images']} captions): "
          f"{result['overall_accuracy_without']:.4f} without, "
          f"{result['overall_accuracy_with']:.4f} with (drop "
          f"{result['overall_accuracy_drop']:.4f})")  # fmt: skip
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "lora"])
  app.run(main)

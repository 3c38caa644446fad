"""The applications of paper Sec. 5.4 scored as the main job reports them (issue 42): a control
plugin, a personalization LoRA and inpainting, each trained on the diffusion run only, used
unchanged with the 50-step teacher and the one-step generator.

  control     edge F1 between the condition's Canny edges and the image's (1-px tolerance), and
              attribute accuracy, with and without the plugin, teacher and one-step, on
              held-out validation scenes (their own edges as conditions);
  lora        how often the concept is drawn for held-out prompts that ask for it, with and
              without the LoRA (one step), and the attribute accuracy of ordinary captions;
  inpainting  one-step: the kept region's PSNR and the repainted shape's attributes, the trained
              route (an `inpaint` plugin) beside the training-free one.

One grid, four rows a module: condition | 50-step teacher | one-step (for the LoRA, the concept's
render; for inpainting, the input with the masked region grayed out).
"""

import json

import jax
import numpy as np

from md_jax.evaluation import concept_eval, edge_f1, inpaint_eval


def _model(workdir, settings) -> dict:
  from md_jax.pipeline.text_to_image import TextToImage

  pipeline, params, step, config = TextToImage.from_checkpoint(
    str(workdir / settings.checkpoint), what=f"stage {settings.checkpoint!r}"
  )
  kw = {"sampler": settings.sampler, "steps": settings.steps, "cfg": settings.cfg}
  return {"pipeline": pipeline, "params": params, "step": int(step), "config": config, "kw": kw}


def _generate(model, prompts, *, params=None, control=None, seed=0, batch_size=32, resolution=64):
  """uint8 images, batch `i`'s noise from fold_in(seed, start row), with and without `control`
  alike; `control` = (adapter, params, maps for all prompts)."""
  out = []
  for start in range(0, len(prompts), batch_size):
    part = slice(start, start + batch_size)
    images = model["pipeline"].generate(
      model["params"] if params is None else params, list(prompts[part]),
      seed=jax.random.fold_in(jax.random.key(seed), start), resolution=resolution,
      control=None if control is None else (control[0], control[1], control[2][part]),
      **model["kw"],
    )  # fmt: skip
    out.append(np.asarray(jax.device_get(images)))
  return np.concatenate(out)


def attribute_accuracy(classify, images, labels) -> float:
  """Mean over the dataset's attributes of the classifier's accuracy against `labels` (canonical,
  `shapes_scene.canonical_labels`), as `shapes_eval`'s "overall"."""
  logits, _ = classify(jax.numpy.asarray(images, jax.numpy.float32) / 127.5 - 1.0)
  return float(np.mean([np.mean(np.asarray(logits[k]).argmax(-1) == v) for k, v in labels.items()]))


def validation_scenes(data_config, num: int, conditions=("canny",)) -> dict:
  """The first `num` validation examples of `data_config`'s dataset at its resolution: images,
  captions, canonical labels and each `conditions` map."""
  from md_jax.data import pipeline as data_pipeline
  from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels

  data = data_config.copy_and_resolve_references()
  data.split, data.label_keys, data.conditions = "validation", tuple(LABEL_NAMES), conditions
  source = data_pipeline.image_source(data)
  preprocess = data_pipeline.make_preprocess(data, train=False)
  rows = list(range(min(num, len(source))))
  examples = [preprocess(e, np.random.default_rng(0)) for e in source.__getitems__(rows)]
  labels = {k: np.array([e[k] for e in examples]) for k in LABEL_NAMES}
  return {
    "image": np.stack([e["image"] for e in examples]),
    "caption": [e["caption"] for e in examples],
    "labels": canonical_labels(labels),
    **{f"condition_{c}": np.stack([e[f"condition_{c}"] for e in examples]) for c in conditions},
  }


def control(models, plugin_run, scenes, classify, *, seed=0) -> tuple[dict, list]:
  """Edge F1 and attribute accuracy, teacher and one-step, without and with the plugin; and the
  grid's columns for the first images."""
  from md_jax.pipeline.control import load_plugin

  adapter, adapter_params, _ = load_plugin(plugin_run, what="stage 'plugin'")
  edges, res = scenes["condition_canny"], scenes["image"].shape[1]
  result = {"plugin": str(plugin_run), "num_images": len(edges)}
  columns = [np.repeat(edges, 3, axis=-1)]
  for name, model in models.items():
    for plugin in (None, (adapter, adapter_params, edges)):
      images = _generate(model, scenes["caption"], control=plugin, seed=seed, resolution=res)
      key = f"{name}{'' if plugin is None else '_plugin'}"
      result[key] = {
        "edge_f1": float(np.mean(edge_f1.batch_edge_f1(edges, images))),
        "accuracy": attribute_accuracy(classify, images, scenes["labels"]),
      }
    columns.append(images)  # the last, with the plugin
  for name in models:
    with_plugin, without = result[f"{name}_plugin"], result[name]
    with_plugin["f1_over_without"] = with_plugin["edge_f1"] / max(without["edge_f1"], 1e-9)
    with_plugin["accuracy_drop"] = without["accuracy"] - with_plugin["accuracy"]
  if "one_step_plugin" in result and "teacher_plugin" in result:
    result["one_step_over_teacher"] = result["one_step_plugin"]["edge_f1"] / max(
      result["teacher_plugin"]["edge_f1"], 1e-9
    )
  return result, columns


def lora(models, lora_path, scenes, classify, *, num_concept, grid_rows, seed=0):
  """The concept rate with and without the LoRA in one step, attribute accuracy on ordinary
  captions with and without it; and the grid's columns (the concept's render, teacher, one-step,
  both with the LoRA)."""
  from md_jax.pipeline import lora_file

  loaded = lora_file.load_lora(lora_path)
  info = loaded[1].get("info") or {}
  token, kind = info.get("token", "sks"), info.get("kind", "bar")
  res = scenes["image"].shape[1]
  prompts = concept_eval.concept_prompts(num_concept, seed=1000, token=token, kind=kind,
                                         resolution=res)  # fmt: skip
  one_step = models["one_step"]
  merged = {n: lora_file.apply_to(m["params"], [(loaded, 1.0)]) for n, m in models.items()}
  with_lora = merged["one_step"]
  concept_images = {
    name: _generate(one_step, prompts.captions, params=p, seed=seed, resolution=res)
    for name, p in (("without", one_step["params"]), ("with", with_lora))
  }
  ordinary = {
    name: _generate(one_step, scenes["caption"], params=p, seed=seed, resolution=res)
    for name, p in (("without", one_step["params"]), ("with", with_lora))
  }
  accuracy = {n: attribute_accuracy(classify, i, scenes["labels"]) for n, i in ordinary.items()}
  result = {
    "lora": str(lora_path), "token": token, "kind": kind, "num_concept": num_concept,
    "concept_rate_with": concept_eval.concept_rate(concept_images["with"], kind),
    "concept_rate_without": concept_eval.concept_rate(concept_images["without"], kind),
    "concept_rate_rendered": concept_eval.concept_rate(prompts.images, kind),
    "accuracy_without": accuracy["without"], "accuracy_with": accuracy["with"],
    "accuracy_drop": accuracy["without"] - accuracy["with"],
  }  # fmt: skip
  rows = slice(0, grid_rows)
  teacher = models["teacher"]
  teacher_params = merged["teacher"]
  columns = [
    prompts.images[rows],
    _generate(teacher, prompts.captions[rows], params=teacher_params, seed=seed, resolution=res),
    concept_images["with"][rows],
  ]
  return result, columns


def inpainting(models, plugin_run, data_config, classify, *, num, grid_rows, margin=3, seed=0):
  """One step: the training-free route, and the trained one when `plugin_run` is given; and the
  grid's columns (the masked input, teacher and one-step by the best route there is)."""
  from md_jax.data import conditions

  scenes = inpaint_eval.single_shape_scenes(data_config, num, resolution=data_config.resolution)
  masks = inpaint_eval.box_masks(scenes["image"], margin)
  maps = np.stack([conditions.inpaint_condition(i, m) for i, m in zip(scenes["image"], masks)])
  plugin = None
  if plugin_run:
    from md_jax.pipeline.control import load_plugin

    adapter, adapter_params, _ = load_plugin(plugin_run, what="stage 'inpaint_plugin'")
    plugin = (adapter, adapter_params, maps)
  routes = {"training_free": None, **({"trained": plugin} if plugin else {})}
  result = {"num": len(masks), "margin": margin, "masked_fraction": float(masks.mean()),
            "plugin": str(plugin_run) if plugin_run else None}  # fmt: skip
  one_step = models["one_step"]
  for name, route in routes.items():
    images = inpaint_eval.inpaint_all(
      one_step["pipeline"], one_step["params"], scenes, masks, control=route, seed=seed,
      **one_step["kw"],
    )  # fmt: skip
    result[name] = inpaint_eval.score(images, scenes, masks, classify)
  if plugin:
    trained, free = result["trained"], result["training_free"]
    result["trained_beats_training_free"] = bool(
      trained["object_right"] > free["object_right"]
      and trained["kept_psnr_median"] > free["kept_psnr_median"]
    )
  rows = slice(0, grid_rows)
  few = {k: v[rows] for k, v in scenes.items()}
  route = None if plugin is None else (plugin[0], plugin[1], maps[rows])
  columns = [maps[rows, ..., :3]]
  for model in models.values():
    columns.append(
      inpaint_eval.inpaint_all(
        model["pipeline"],
        model["params"],
        few,
        masks[rows],
        control=route,
        seed=seed,
        **model["kw"],
      )
    )
  return result, columns


def evaluate(settings, workdir, classifier_run, *, stages, lora_path=None, grid=None, seed=0):
  """The figures of every module whose stage is in `stages` (the job's order), and the grid
  (`grid`: a PNG path). `settings`: the main job's `config.applications`."""
  from md_jax.evaluation import feature_networks
  from md_jax.infra import sharding

  wanted = {k: settings[k] for k in ("control", "lora", "inpainting") if settings.get(k)}
  if not any(stage in stages for stage in wanted.values()):
    return {}
  models = {name: _model(workdir, settings[name]) for name in ("teacher", "one_step")}
  mesh = sharding.create_mesh((-1, 1))
  _, classify, _ = feature_networks.shapes_classifier_features(str(classifier_run), mesh)
  data_config = models["one_step"]["config"].data  # at the final resolution, as G generates
  scenes = validation_scenes(data_config, settings.num_images)
  result, grid_rows = {}, []
  rows = settings.grid_rows
  if wanted.get("control") in stages:
    result["control"], columns = control(
      models, workdir / wanted["control"], scenes, classify, seed=seed
    )
    grid_rows.append([c[:rows] for c in columns])
  if wanted.get("lora") in stages:
    result["lora"], columns = lora(
      models, lora_path, scenes, classify, num_concept=settings.num_concept, grid_rows=rows,
      seed=seed,
    )  # fmt: skip
    grid_rows.append(columns)
  # Inpainting needs no trained module: without its plugin stage it scores the training-free
  # route alone.
  if "inpainting" in wanted:
    trained = wanted["inpainting"] in stages
    result["inpainting"], columns = inpainting(
      models, workdir / wanted["inpainting"] if trained else None, data_config, classify,
      num=settings.num_images, grid_rows=rows, seed=seed,
    )  # fmt: skip
    grid_rows.append(columns)
  if grid:
    from md_jax import visualize

    blocks = [np.stack(columns, axis=1) for columns in grid_rows]  # (rows, 3, H, W, 3) each
    cells = np.concatenate(blocks).reshape(-1, *blocks[0].shape[2:])
    visualize.save_png(
      visualize.make_grid(cells, columns=3), grid,
      text={"columns": "condition | 50-step teacher | one-step",
            "rows": json.dumps([k for k in ("control", "lora", "inpainting") if k in result])},
    )  # fmt: skip
    result["grid"] = str(grid)
  return result

r"""Whether a trained diffusion run draws the shapes' kinds from the caption: two probes on real
held-out `shapes` images, scored by the attribute classifier.

  python -m md_jax.tools.kind_probe --workdir=workdirs/main/diffusion \
      [--classifier=workdirs/main/shapes_classifier] [--timesteps=50,150,300,450,600,750,900] \
      [--sdedit_starts=300,450,600,750] [--num_images=256] [--cfg=3.0]

reconstruction: the real image classified as is, and encoded and decoded with no UNet: the
  ceiling the probes below sit under (the autoencoder's own loss of outlines).
one-shot: a real image's latent noised to t, the UNet's x̂₀ decoded and classified; the first
  shape's kind and colour accuracy, unguided and with CFG, per t.
sdedit: one-shape scenes noised to t₀ and sampled down to 0 (25 DDIM steps, CFG), captioned truly
  or with the kind word swapped for the next kind. `true_kept`: the real kind drawn with the true
  caption; `swap_kept`: still drawn with the swapped caption; `swap_drawn`: the swapped-in kind
  drawn. A model that draws kinds from the caption has `swap_drawn` far above chance (0.25).
Last line: one JSON object.
"""

import functools
import json
import pathlib

import numpy as np
from absl import app, flags

_SDEDIT_STEPS = 25


def swap_kind_word(tokens: np.ndarray, kind_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Each caption's first kind token replaced by the next kind's; returns the tokens and the
  swapped-in kind index per caption."""
  swapped, drawn = tokens.copy(), np.zeros(len(tokens), np.int32)
  for row in range(len(tokens)):
    position = np.flatnonzero(np.isin(tokens[row], kind_ids))
    if not position.size:
      raise ValueError(f"caption {row} names no shape kind")
    new = (kind_ids.index(int(tokens[row, position[0]])) + 1) % len(kind_ids)
    swapped[row, position[0]], drawn[row] = kind_ids[new], new
  return swapped, drawn


def probe(workdir, classifier, timesteps, starts, *, num_images=256, cfg=3.0, batch_size=64):
  import jax
  import jax.numpy as jnp

  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.data.pipeline import create_input_iterator
  from md_jax.data.shapes_scene import KINDS, LABEL_NAMES, canonical_labels
  from md_jax.diffusion import samplers
  from md_jax.infra import checkpoints, sharding
  from md_jax.models.shapes_classifier import ShapesClassifier
  from md_jax.pipeline.text_to_image import TextToImage, to_uint8

  cls_config, cls_tree, _ = checkpoints.open_checkpoint(classifier, "--classifier")
  classify = jax.jit(
    functools.partial(
      ShapesClassifier.from_config(cls_config).apply,
      {"params": cls_tree["classifier"]["ema_params"]},
    )
  )
  pipeline, params, _, config = TextToImage.from_checkpoint(workdir, what="--workdir")
  schedule = pipeline.schedule
  for t in (*timesteps, *starts):
    if not 0 <= t < schedule.num_steps:
      raise ValueError(f"timestep {t}: expected 0 ≤ t < {schedule.num_steps}")
  params = jax.device_put(params)
  kind_ids = [int(tokenizer_lib.tokenize(pipeline.tokenizer, [k])[0][1]) for k in KINDS]

  def denoiser(tokens, scale):
    text = pipeline.encode_text(params.text_encoder, tokens)
    if scale == 1.0:  # a self-conditioning sampler adds the previous x̂_0
      return pipeline.denoiser(params.unet, text)
    model = lambda x, t, c, **kw: pipeline.unet.apply({"params": params.unet}, x, t, c, **kw)
    null = pipeline.null_text(params.unet, params.text_encoder, len(tokens))
    return samplers.classifier_free_guidance(model, text, null, scale)

  def to_classifier(latents):
    images = pipeline.latent_space.decode(params.autoencoder, latents)
    return to_uint8(images).astype(jnp.float32) / 127.5 - 1.0

  @jax.jit
  def reconstruct(images):
    return to_classifier(pipeline.latent_space.encode(params.autoencoder, images))

  @functools.partial(jax.jit, static_argnames=("scale", "sdedit"))
  def denoise(images, tokens, key, t, *, scale, sdedit):
    x0 = pipeline.latent_space.encode(params.autoencoder, images)
    ts = jnp.full((len(x0),), t)
    x_t = schedule.add_noise(x0, jax.random.normal(key, x0.shape), ts)
    if sdedit:
      latents = samplers.ddim_sample(
        denoiser(tokens, scale), schedule, x_t, _SDEDIT_STEPS, prediction=pipeline.prediction,
        start=t, self_condition=pipeline.unet.self_condition,
      )  # fmt: skip
    else:
      out = denoiser(tokens, scale)(x_t, ts)
      latents = schedule.to_x0_and_eps(out, x_t, ts, pipeline.prediction)[0]
    return to_classifier(latents)

  data_config = config.data.copy_and_resolve_references()
  data_config.split, data_config.resolution = "validation", cls_config.data.resolution
  data_config.label_keys = tuple(LABEL_NAMES)
  mesh = sharding.create_mesh((-1, 1))  # data-parallel over every device
  iterator = create_input_iterator(
    data_config, global_batch_size=batch_size, mesh=mesh,
    rules=sharding.logical_axis_rules(None), train=False,
  )  # fmt: skip
  hits = {}

  def score(name, images, labels, key="kind_0", where=None):
    predicted = np.asarray(classify(images)[0][key]).argmax(-1)
    right = predicted == labels if where is None else (predicted == labels)[where]
    hits.setdefault(name, []).append(right)

  try:
    for i, batch in enumerate(iterator):
      if i * batch_size >= num_images:
        break
      key = jax.random.key(i)
      labels = canonical_labels({k: np.asarray(batch[k]) for k in LABEL_NAMES})
      for row, images in (("real", batch["image"]), ("decoded", reconstruct(batch["image"]))):
        score(("reconstruction", row, "kind"), images, labels["kind_0"])
        score(("reconstruction", row, "colour"), images, labels["color_0"], "color_0")
      for t in timesteps:
        for scale in (1.0, cfg):
          images = denoise(batch["image"], batch["tokens"], key, t, scale=scale, sdedit=False)
          score(("one_shot", t, f"kind, cfg {scale:g}"), images, labels["kind_0"])
          score(("one_shot", t, f"colour, cfg {scale:g}"), images, labels["color_0"], "color_0")
      # One-shape scenes only: the first kind word then names the only shape.
      one_shape = np.asarray(batch["num_shapes"]) == 0
      tokens = np.asarray(batch["tokens"])
      swapped, drawn = swap_kind_word(tokens, kind_ids)
      kind = np.asarray(batch["kind_0"])
      for t in starts:
        true = denoise(batch["image"], tokens, key, t, scale=cfg, sdedit=True)
        swap = denoise(batch["image"], swapped, key, t, scale=cfg, sdedit=True)
        score(("sdedit", t, "true_kept"), true, kind, where=one_shape)
        score(("sdedit", t, "swap_kept"), swap, kind, where=one_shape)
        score(("sdedit", t, "swap_drawn"), swap, drawn, where=one_shape)
  finally:
    iterator.close()
  if not hits:
    raise ValueError(f"the validation split has fewer than {batch_size} images")
  result = {"reconstruction": {}, "one_shot": {}, "sdedit": {}}
  for (probe_name, t, name), values in hits.items():
    row = t if probe_name == "reconstruction" else f"t={t}"
    result[probe_name].setdefault(row, {})[name] = float(np.mean(np.concatenate(values)))
  return result


def define_flags():
  """The command-line flags; defined only when this module runs as a program, so that importing
  it next to another tool (caption_sensitivity also has --timesteps) cannot collide."""
  flags.DEFINE_string("workdir", None, "A diffusion-family run or checkpoint.")
  flags.DEFINE_string("classifier", None, "A shapes_classifier run (default: beside --workdir).")
  flags.DEFINE_list("timesteps", ["50", "150", "300", "450", "600", "750", "900"], "One-shot t.")
  flags.DEFINE_list("sdedit_starts", ["300", "450", "600", "750"], "SDEdit t₀.")
  flags.DEFINE_integer("num_images", 256, "Held-out images (batches of 64).")
  flags.DEFINE_float("cfg", 3.0, "Classifier-free guidance scale.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  classifier = f.classifier or str(pathlib.Path(f.workdir).parent / "shapes_classifier")
  result = probe(
    f.workdir, classifier, [int(t) for t in f.timesteps], [int(t) for t in f.sdedit_starts],
    num_images=f.num_images, cfg=f.cfg,
  )  # fmt: skip
  for probe_name, rows in result.items():
    print(probe_name)
    for t, values in rows.items():
      print(f"  {t:6s} " + "  ".join(f"{k} {v:.2f}" for k, v in values.items()))
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)

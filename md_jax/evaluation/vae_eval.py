"""Reconstruction quality of a `vae` or `decoder_distill` checkpoint on held-out images.

    python -m md_jax.evaluation.vae_eval --checkpoint=workdirs/vae_tiny [--split=validation]
        [--num_images=512] [--batch_size=32] [--data_dir=...]

Encodes each image to its posterior mean, decodes it (with the light decoder for a
`decoder_distill` checkpoint), and prints the mean per-image PSNR (dB, images in [0, 1]) and the
mean squared error; the last line is one JSON object. The model and data config come from the
checkpoint itself.
"""

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def evaluate(checkpoint: str, *, split: str, num_images: int, batch_size: int, data_dir=None):
  """{"psnr_db", "mse", "num_images", "stage", "step"} for `checkpoint` on `split`."""
  import jax
  import numpy as np

  from md_jax.data.pipeline import create_input_iterator
  from md_jax.infra import checkpoints, sharding
  from md_jax.models.vae import autoencoder_from_config, autoencoder_params, psnr

  config, tree, step = checkpoints.open_checkpoint(
    checkpoint, "--checkpoint", ("vae", "decoder_distill")
  )
  model = autoencoder_from_config(config.model, light=config.stage == "decoder_distill")
  trained = tree["autoencoder"]["ema_params" if config.eval_ema else "params"]
  params = jax.device_put(autoencoder_params(tree["frozen"], trained))  # once, not per batch

  @jax.jit
  def score(params, images):
    recon, _ = model.apply({"params": params}, images)  # the posterior mean, decoded
    # Scored on what a viewer gets: reconstructions rounded to 8 bits like the originals.
    recon = jax.numpy.round((jax.numpy.clip(recon, -1, 1) + 1) * 127.5) / 127.5 - 1
    return psnr(images, recon)

  data_config = config.data.copy_and_resolve_references()
  data_config.split = split
  if data_dir is not None:
    data_config.data_dir = data_dir
  mesh = sharding.create_mesh((-1, 1))  # data-parallel over every device
  rules = sharding.logical_axis_rules(None)
  iterator = create_input_iterator(
    data_config, global_batch_size=batch_size, mesh=mesh, rules=rules, train=False
  )
  scores = []
  try:
    for batch in iterator:
      scores.append(np.asarray(score(params, batch["image"])))
      if sum(map(len, scores)) >= num_images:
        break
  finally:
    iterator.close()
  if not scores:
    raise ValueError(f"split {split!r} has fewer than --batch_size={batch_size} images")
  values = np.concatenate(scores)[:num_images]
  mse01 = np.mean(10.0 ** (-values / 10.0))  # per-image MSE on [0, 1] images, averaged
  return {
    "psnr_db": float(np.mean(values)),
    "mse": float(mse01),
    "num_images": len(values),
    "stage": config.stage,
    "step": int(step),
    "latent_std": float(tree["latent_std"]),
  }


def define_flags():
  """The command-line flags; defined only when this module runs as a program, so that importing
  it as a library next to another CLI module cannot collide on a flag name."""
  flags.DEFINE_string("checkpoint", None, "A vae/decoder_distill workdir or checkpoint.")
  flags.DEFINE_string("split", "validation", "Dataset split to reconstruct.")
  flags.DEFINE_integer("num_images", 512, "How many images (whole batches).")
  flags.DEFINE_integer("batch_size", 32, "Global batch size.")
  flags.DEFINE_string("data_dir", None, "Overrides the checkpoint's config.data.data_dir.")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  result = evaluate(
    FLAGS.checkpoint,
    split=FLAGS.split,
    num_images=FLAGS.num_images,
    batch_size=FLAGS.batch_size,
    data_dir=FLAGS.data_dir,
  )
  logging.info("PSNR %.2f dB over %d images", result["psnr_db"], result["num_images"])
  print(f"{result['stage']} step {result['step']}: PSNR {result['psnr_db']:.2f} dB "
        f"on {result['num_images']} {FLAGS.split} images")  # fmt: skip
  print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main)

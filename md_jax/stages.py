"""Which code runs each `config.stage`: the one dispatch `md_jax.main` and the main job share.

Imports are inside the branches, so a job pays only for the stage it runs.
"""


def run_stage(config, workdir: str):
  """Runs the stage the config names. A plain `if`: a misspelt stage fails here, by name."""
  if config.stage == "main":
    from md_jax import main_job

    return main_job.run(config, workdir)
  if config.stage == "data":
    from md_jax.data import stream

    return stream.run(config, workdir)
  if config.stage in ("diffusion", "relu_finetune"):
    from md_jax.training import diffusion, trainer

    if config.stage == "relu_finetune" and not config.init_checkpoint:
      raise ValueError("config.init_checkpoint must name the softmax diffusion run to finetune")

    trainer.train_and_evaluate(config, workdir, diffusion.DiffusionStage(config))
    return None
  if config.stage in ("vae", "decoder_distill"):
    from md_jax.training import trainer, vae

    if config.stage == "decoder_distill" and not config.init_checkpoint:
      raise ValueError("config.init_checkpoint must name the vae run whose encoder is frozen")
    trainer.train_and_evaluate(config, workdir, vae.VAEStage(config))
    return None
  if config.stage == "ufogen":
    from md_jax.training import trainer, ufogen

    if not config.init_checkpoint:
      raise ValueError("config.init_checkpoint must name the diffusion run G and D start from")
    trainer.train_and_evaluate(config, workdir, ufogen.UFOGenStage(config))
    return None
  if config.stage == "shapes_classifier":
    from md_jax.training import shapes_classifier, trainer

    trainer.train_and_evaluate(config, workdir, shapes_classifier.ShapesClassifierStage(config))
    return None
  if config.stage == "latent_classifier":
    from md_jax.training import latent_classifier, trainer

    trainer.train_and_evaluate(config, workdir, latent_classifier.LatentClassifierStage(config))
    return None
  raise ValueError(
    f"config.stage={config.stage!r} is not a known stage (known: main, data, diffusion, "
    "relu_finetune, vae, decoder_distill, ufogen, shapes_classifier, latent_classifier)"
  )

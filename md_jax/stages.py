"""Which code runs each training `config.stage`: the dispatch `md_jax.main` and the main job share
(`md_jax.main` runs the main job itself, which calls back here for each of its stages).

Imports are inside the branches, so a job pays only for the stage it runs.
"""

# The exit status of a run that saved and stopped before its last step (SIGTERM, Ctrl-C, a TPU
# maintenance notice): rerunning the same command resumes it. 75 is sysexits' EX_TEMPFAIL.
EXIT_TO_RESUME = 75


def run_stage(config, workdir: str):
  """Runs the stage the config names; a misspelt stage fails here, by name. Returns
  {"stopped_in", "step"} when the run stopped before its last step, else None."""
  if config.stage == "data":
    from md_jax.data import stream

    return stream.run(config, workdir)
  if config.stage in ("diffusion", "relu_finetune"):
    from md_jax.training.diffusion import DiffusionStage as stage_class
  elif config.stage in ("vae", "decoder_distill"):
    from md_jax.training.vae import VAEStage as stage_class
  elif config.stage == "ufogen":
    from md_jax.training.ufogen import UFOGenStage as stage_class
  elif config.stage == "shapes_classifier":
    from md_jax.training.shapes_classifier import ShapesClassifierStage as stage_class
  elif config.stage == "latent_classifier":
    from md_jax.training.latent_classifier import LatentClassifierStage as stage_class
  else:
    raise ValueError(
      f"config.stage={config.stage!r} is not a known stage (known: main, data, diffusion, "
      "relu_finetune, vae, decoder_distill, ufogen, shapes_classifier, latent_classifier)"
    )
  import jax

  from md_jax.infra import phases
  from md_jax.training import trainer

  state = trainer.train_and_evaluate(config, workdir, stage_class(config))
  step = int(jax.device_get(state.step))
  if step < phases.final_step(config):  # SIGTERM, Ctrl-C or preemption: saved, to be resumed
    return {"stopped_in": config.stage, "step": step}
  return None

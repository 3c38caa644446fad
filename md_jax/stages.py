"""Which code runs each training `config.stage`: the dispatch `md_jax.main` and the main job share
(`md_jax.main` runs the main job itself, which calls back here for each of its stages).

Imports are inside the branches, so a job pays only for the stage it runs.
"""

# The exit status of a run that saved and stopped before its last step (SIGTERM, Ctrl-C, a TPU
# maintenance notice): rerunning the same command resumes it. 75 is sysexits' EX_TEMPFAIL.
EXIT_TO_RESUME = 75


def stage_class(name: str):
  """The `training.stage.Stage` subclass that trains `config.stage == name`; None for `data`. A
  misspelt stage fails here, by name."""
  if name == "data":
    return None
  if name in ("diffusion", "relu_finetune"):
    from md_jax.training.diffusion import DiffusionStage as cls
  elif name in ("vae", "decoder_distill"):
    from md_jax.training.vae import VAEStage as cls
  elif name == "ufogen":
    from md_jax.training.ufogen import UFOGenStage as cls
  elif name == "step_distill":
    from md_jax.training.step_distill import StepDistillStage as cls
  elif name == "shapes_classifier":
    from md_jax.training.shapes_classifier import ShapesClassifierStage as cls
  elif name == "latent_classifier":
    from md_jax.training.latent_classifier import LatentClassifierStage as cls
  elif name == "plugin":
    from md_jax.training.plugin import PluginStage as cls
  elif name == "lora":
    from md_jax.training.dreambooth_lora import LoRAStage as cls
  else:
    raise ValueError(
      f"config.stage={name!r} is not a known stage (known: main, data, diffusion, "
      "relu_finetune, vae, decoder_distill, ufogen, step_distill, shapes_classifier, "
      "latent_classifier, plugin, lora)"
    )
  return cls


def build_stage(config):
  """The stage object that trains `config` (None for `data`); its constructor checks what it
  reads (e.g. a latent space's checkpoint), before anything compiles."""
  cls = stage_class(config.stage)
  return None if cls is None else cls(config)


def run_stage(config, workdir: str, stage=None):
  """Runs the stage the config names (`stage`: one `build_stage` made already). Returns
  {"stopped_in", "step"} when the run stopped before its last step, else None."""
  if config.stage == "data":
    from md_jax.data import stream

    return stream.run(config, workdir)
  stage = stage if stage is not None else build_stage(config)
  import jax

  from md_jax.infra import phases
  from md_jax.training import trainer

  state = trainer.train_and_evaluate(config, workdir, stage)
  step = int(jax.device_get(state.step))
  if step < phases.final_step(config):  # SIGTERM, Ctrl-C or preemption: saved, to be resumed
    return {"stopped_in": config.stage, "step": step}
  return None

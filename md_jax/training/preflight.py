"""Every check of a run's config that can be made before anything is compiled or written.

    preflight.check_config(config, stage, workdir=workdir)

A bad value raises a ValueError (or FileNotFoundError for a path) of one line that names the
config key and its value, e.g. `config.global_batch_size=12 is not divisible by the 8 batch shards
of config.mesh (data=2 × fsdp=4)`. `md_jax.main` runs it on every stage config before writing
`config.json`; the trainer runs it again with the stage it builds.

`stage` is a `training.stage.Stage` instance or class (what `starts_from` and
`needs_init_checkpoint` say); `upcoming` maps the workdirs that earlier stages of the same job
will write to their configs, so a job's later stages are checked before those runs exist.
"""

import os

import ml_collections

from md_jax.infra import checkpoints, phases

DIFFUSION_FAMILY = ("diffusion", "relu_finetune", "ufogen", "step_distill")  # text→image UNets
# Keys of `model` (the UNet) and `text_encoder` whose values set parameter shapes: a run that
# starts from another's weights copies them whole, so each must agree with the source's.
UNET_SHAPE_KEYS = (
  "in_channels", "out_channels", "channels", "block_types", "down_transformer_depths",
  "up_transformer_depths", "mid_transformer_depth", "time_embed_dim", "text_dim", "head_dim",
  "ffn_expansion", "separable_expansion",
)  # fmt: skip
TEXT_ENCODER_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers")


def check_config(config, stage=None, *, workdir=None, upcoming=None) -> None:
  """All the checks below; the init checkpoint's only for a run that has no checkpoint of its own
  yet (a resumed run reads its own)."""
  check_intervals(config)
  check_batch_sizes(config)
  check_resolutions(config, upcoming)
  check_data(config)
  check_paths(config, upcoming)
  check_cached_latents(config, upcoming)
  if workdir is None or checkpoints.completed_step(workdir) is None:
    check_init_checkpoint(config, stage, upcoming)
  else:
    check_resume(config, workdir)


def check_resume(config, workdir) -> None:
  """A run resumed in `workdir` is of the stage its checkpoints are, and of a model they fit."""
  try:
    saved = ml_collections.ConfigDict(checkpoints.saved_config(str(workdir), "--workdir"))
  except (OSError, ValueError):  # an unreadable latest checkpoint: the trainer's restore decides
    return
  where = f"the latest checkpoint in --workdir={str(workdir)!r}"
  if saved.get("stage") != config.get("stage"):
    raise ValueError(
      f"{where} is of a {saved.get('stage')!r} run, and config.stage={config.get('stage')!r} "
      "(use another workdir)"
    )
  if config.get("stage") in DIFFUSION_FAMILY:
    _check_same_shapes(config, saved, where)


def check_intervals(config) -> None:
  """Intervals the loop divides by."""
  for key, default, least in (("checkpoint_every", 1000, 1), ("log_every", 50, 1),
                              ("sample_every", 0, 0)):  # fmt: skip
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ValueError(f"config.{key}={value!r}: expected an integer ≥ {least}")


def source_config(path: str, what: str, upcoming=None) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with, or, for a workdir an earlier stage of this job has
  not written yet, the config that stage will write it with."""
  for produced, config in (upcoming or {}).items():
    same = os.path.abspath(path) == os.path.abspath(produced)
    if same and checkpoints.completed_step(produced) is None:
      return config
  return ml_collections.ConfigDict(checkpoints.saved_config(path, what))


def check_init_checkpoint(config, stage, upcoming=None) -> None:
  """`config.init_checkpoint` names a run of a stage this one starts from (and is given where the
  stage needs one) whose weights fit this run's model."""
  source = config.get("init_checkpoint")
  what = "config.init_checkpoint"
  if not source:
    needs = getattr(stage, "needs_init_checkpoint", None)
    if needs:
      raise ValueError(f"{what} is empty; it must name {needs}")
    return
  saved = source_config(source, what, upcoming)
  if stage is None:
    return
  starts_from = getattr(stage, "starts_from", ())
  name = stage.__name__ if isinstance(stage, type) else type(stage).__name__
  if saved.get("stage") not in starts_from:
    expected = f"one of {starts_from}" if starts_from else "no other run"
    raise ValueError(
      f"{what}={source!r} is a {saved.get('stage')!r} run; a {name} starts from {expected}"
    )
  if config.get("stage") in DIFFUSION_FAMILY and saved.get("stage") in DIFFUSION_FAMILY:
    _check_same_shapes(config, saved, f"{what}={source!r}")


def _check_same_shapes(config, saved, where: str) -> None:
  pairs = [("model", k) for k in UNET_SHAPE_KEYS]
  if not config.text_encoder.get("path") and not saved.text_encoder.get("path"):
    pairs += [("text_encoder", k) for k in TEXT_ENCODER_SHAPE_KEYS]
  for block, key in pairs:
    ours, theirs = _plain(config[block].get(key)), _plain(saved[block].get(key))
    if ours != theirs:
      raise ValueError(
        f"{where} has config.{block}.{key}={theirs!r}, this run {ours!r}: its weights do not "
        "fit this model"
      )


def _plain(value):
  """Tuples and lists alike (a config read back from JSON has lists)."""
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _phase_keys(config):
  """[(resolution key, resolution, batch key, batch)] per phase, named as the config names them."""
  prog = config.get("progressive")
  if prog and prog.get("resolutions"):
    phases.phases_from_config(config)  # the lengths agree, or one error naming them
    return [
      (f"config.progressive.resolutions[{i}]", r, f"config.progressive.batch_sizes[{i}]", b)
      for i, (r, b) in enumerate(zip(prog.resolutions, prog.batch_sizes))
    ]
  data = config.get("data")
  resolution = data.get("resolution") if data is not None else None
  return [("config.data.resolution", resolution, "config.global_batch_size",
           config.get("global_batch_size"))]  # fmt: skip


def _positive_int(key: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{key}={value!r}: expected a positive integer")


def check_batch_sizes(config) -> None:
  """Every phase's global batch splits evenly over the mesh's batch axes and the processes."""
  if config.get("mesh") is None:
    return
  import jax

  from md_jax.infra import sharding

  mesh = sharding.create_mesh(config.mesh)  # a mesh that does not fit the devices: named there
  rules = sharding.logical_axis_rules(config.get("logical_axis_rules"))
  shards = sharding.batch_axis_size(mesh, rules)
  layout = " × ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
  for _, _, key, batch in _phase_keys(config):
    if batch is None:
      continue
    _positive_int(key, batch)
    if batch % shards:
      raise ValueError(
        f"{key}={batch} is not divisible by the {shards} batch shards of config.mesh "
        f"({layout} over {mesh.size} devices)"
      )
    if batch % jax.process_count():
      raise ValueError(f"{key}={batch} is not divisible by the {jax.process_count()} processes")


def latent_factor(config, upcoming=None) -> tuple[int, str] | None:
  """(pixels per latent along a side, where that comes from), or None for a stage without one."""
  from md_jax.models import vae

  latents = config.get("latents")
  model = config.get("model")
  if latents is None:
    if model is not None and "encoder" in model:  # the vae and decoder_distill stages
      factor = vae.downsample_factor(model)
      return factor, f"the autoencoder's, 2^(len(config.model.encoder.channel_mult) - 1) = {factor}"
    return None
  kind = latents.get("kind")
  if kind == "pixels":
    return 1, "pixel space"
  if kind == "projection":
    _positive_int("config.latents.downsample", latents.downsample)
    return latents.downsample, f"config.latents.downsample={latents.downsample}"
  if kind == "vae" and latents.get("checkpoint"):
    what = "config.latents.checkpoint"
    saved = source_config(latents.checkpoint, what, upcoming)
    if saved.get("model") is None or "encoder" not in saved.model:
      raise ValueError(
        f"{what}={latents.checkpoint!r} is a {saved.get('stage')!r} run; expected a vae or "
        "decoder_distill run"
      )
    factor = vae.downsample_factor(saved.model)
    return factor, f"the autoencoder of {what}={latents.checkpoint!r} downsamples by {factor}"
  return None  # an unknown kind or a missing checkpoint: the latent space says so, by name


def check_resolutions(config, upcoming=None) -> None:
  """Every phase's resolution maps to whole latents, which the UNet's levels can halve."""
  found = latent_factor(config, upcoming)
  model = config.get("model")
  levels = 1
  if config.get("stage") in DIFFUSION_FAMILY and model is not None and "block_types" in model:
    levels = len(model.channels)
  for key, resolution, _, _ in _phase_keys(config):
    if resolution is None:
      continue
    _positive_int(key, resolution)
    if found is None:
      continue
    factor, why = found
    if resolution % factor:
      raise ValueError(f"{key}={resolution} is not divisible by the latent factor {factor} ({why})")
    halvings = 2 ** (levels - 1)
    if (resolution // factor) % halvings:
      size = resolution // factor
      raise ValueError(
        f"{key}={resolution} gives {size}×{size} latents; the UNet's {levels} levels "
        f"(config.model.channels) need a multiple of {halvings}: use a resolution that is a "
        f"multiple of {factor * halvings}"
      )


def check_data(config) -> None:
  """`config.data.dataset` is a TFDS dataset (and config) there is; the tokenizer files exist."""
  data = config.get("data")
  if data is None:
    return
  from md_jax.data import prepare, tokenizer

  if data.get("dataset"):
    prepare.check_dataset(data.dataset, data.get("data_dir") or None)
  tokenizer.check_tokenizer_dir(*tokenizer.tokenizer_dir_of(config))
  check_text_encoder(config)


def check_text_encoder(config) -> None:
  """Pretrained CLIP weights (`config.text_encoder.path`) fit the run: the tokenizer's vocabulary
  is the one their embedding table was trained on, and their width is the UNet's `text_dim`."""
  text_encoder = config.get("text_encoder")
  if text_encoder is None or not text_encoder.get("path"):
    return
  from md_jax.data import tokenizer
  from md_jax.models.clip_weights import read_hf_config
  from md_jax.models.text_encoder import CLIPTextEncoder

  where = f"config.text_encoder.path={text_encoder.path!r}"
  module = CLIPTextEncoder.from_hf_config(read_hf_config(text_encoder.path))
  directory, what = tokenizer.tokenizer_dir_of(config)
  vocabulary = len(tokenizer.load_tokenizer(directory, what))
  if vocabulary != module.vocab_size:
    raise ValueError(
      f"{what}={directory!r} holds a vocabulary of {vocabulary} tokens, but the text encoder at "
      f"{where} embeds {module.vocab_size}: they are not one CLIP (give the tokenizer files of "
      "the same checkpoint)"
    )
  text_dim = config.get("model", {}).get("text_dim")
  if text_dim is not None and text_dim != module.hidden_size:
    raise ValueError(
      f"config.model.text_dim={text_dim}, but the text encoder at {where} is "
      f"{module.hidden_size} wide (set config.model.text_dim={module.hidden_size})"
    )


def check_cached_latents(config, upcoming=None) -> None:
  """`config.latents.cached` is a finished cache, for every phase's resolution, of the arrays this
  run's UNet reads, for a stage that reads it and a text encoder that stays frozen."""
  latents = config.get("latents")
  root = latents.get("cached") if latents is not None else None
  if not root:
    return
  what = f"config.latents.cached={root!r}"
  if config.get("stage") not in ("diffusion", "relu_finetune"):
    raise ValueError(f"{what}: only the diffusion and relu_finetune stages read cached latents")
  if config.text_encoder.get("train", False):
    raise ValueError(
      f"{what} with config.text_encoder.train=True: the states of a text encoder that trains "
      "cannot be cached (train it on images and captions, or freeze it)"
    )
  from md_jax.data import latent_cache, tokenizer

  found = latent_factor(config, upcoming)
  channels = config.model.in_channels
  text_shape = (tokenizer.CONTEXT_LENGTH, config.model.text_dim)
  for _, resolution, _, _ in _phase_keys(config):
    builder = latent_cache.open_cache(root, resolution)
    latent_cache.check_split(builder, root, resolution, config.data.split)
    size = resolution // found[0] if found else builder.info.features["latents"].shape[0]
    latent_cache.check_shapes(builder, resolution, (size, size, channels), text_shape)
    _warn_if_made_otherwise(config, latent_cache.read_spec(root, resolution), root, resolution)


def _warn_if_made_otherwise(config, spec: dict, root: str, resolution: int) -> None:
  """A cache made from another VAE run, text encoder or dataset has the right shapes and the
  wrong numbers; paths can differ between machines, so that is said, not refused."""
  import logging

  ours = {
    "latents.checkpoint": config.latents.get("checkpoint", ""),
    "text_encoder.path": config.text_encoder.get("path", ""),
    "data.dataset": config.data.get("dataset", ""),
  }
  for key, value in ours.items():
    if key in spec and spec[key] != value:
      logging.warning(
        "config.latents.cached=%r: its %d px cache was made with config.%s=%r, this run has %r",
        root, resolution, key, spec[key], value,
      )  # fmt: skip


def check_paths(config, upcoming=None) -> None:
  """Files and runs the config names beside the init checkpoint exist."""
  text_encoder = config.get("text_encoder")
  if text_encoder is not None and text_encoder.get("path"):
    _exists(text_encoder.path, "config.text_encoder.path")
  perceptual = config.get("perceptual")
  if perceptual is not None and perceptual.get("weight", 0) > 0 and perceptual.get("weights"):
    _exists(perceptual.weights, "config.perceptual.weights")
  for what, block in (
    ("config.representation_alignment", config.get("representation_alignment")),
    ("config.ufogen.classifier", config.get("ufogen", {}).get("classifier")),
  ):
    if block is not None and block.get("weight", 0) > 0 and block.get("checkpoint"):
      source_config(block.checkpoint, f"{what}.checkpoint", upcoming)


def _exists(path: str, what: str) -> None:
  if "://" not in path and not os.path.exists(path):
    raise FileNotFoundError(f"{what}={path!r} does not exist")

"""The programs a phone runs: pure functions of the trained weights and the inputs.

  text_encoder  token_ids (B, 77) int32 → text_embeddings (B, 77, D)
  unet          latents (B, h, w, c), timestep (B,) int32, text_embeddings → prediction (B, h, w, c)
  decoder       latents (B, h, w, c) → image (B, H, W, 3) float32 in [0, 1]
  one_step      token_ids, noise (B, h, w, c) → image: text encoder → one UNet call at t = T−1
                (UFOGen's sampler, paper Sec. 4) → light decoder, fused in one program

Export closes over the weights (they become the artifact's constants); the reference outputs pass
them as arguments (one compile, no gigabytes of constants in an XLA executable).
Latents are the diffusion model's (scaled by the VAE's 1/std), so the programs chain as the JAX
sampler chains them. Noise is an input, not drawn inside: the artifact has no RNG op (mobile
converters take none) and the app controls the seed. Every program computes in float32, whatever
dtype the training config computed in: fp16 and int8 are the converters' choice, per artifact.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from md_jax.data import tokenizer as tokenizer_lib
from md_jax.diffusion import samplers
from md_jax.training import checkpoints

PROGRAMS = ("text_encoder", "unet", "decoder", "one_step")
DIFFUSION_STAGES = ("diffusion", "relu_finetune", "ufogen")
LATENT_STAGES = ("vae", "decoder_distill")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  shape: tuple[int, ...]
  dtype: str

  def to_json(self) -> dict:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

  @classmethod
  def from_json(cls, d: dict) -> "TensorSpec":
    return cls(d["name"], tuple(d["shape"]), d["dtype"])

  def abstract(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))


@dataclasses.dataclass(frozen=True)
class Program:
  """One exportable function at one fixed batch size (a symbolic batch converts nowhere)."""

  name: str  # e.g. "unet_b2"
  kind: str  # one of PROGRAMS
  batch: int
  fn: Callable  # fn(weights, *inputs)
  weights: object
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]


@dataclasses.dataclass
class Source:
  """What is exported: the stage, its float32 params, and where they came from."""

  stage: object  # a DiffusionStage (every program) or None (decoder only)
  unet_params: object
  text_params: object
  decoder: object  # (autoencoder module, params, latent scale)
  latent_shape: Callable[[int], tuple[int, int, int]]
  text_dim: int | None
  resolution: int
  description: dict  # checkpoint, stage, step, config hash: for the manifest

  @property
  def kinds(self) -> tuple[str, ...]:
    return PROGRAMS if self.stage is not None else ("decoder",)


def config_hash(config) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _float32(tree):
  """Host arrays, floating ones as float32 (bf16 params would make every weight a bf16 constant)."""

  def cast(x):
    x = np.asarray(x)
    return x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, tree)


def _compute_in_float32(config):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dtype = "float32"
  if "text_encoder" in config:
    config.text_encoder.dtype = "float32"
  return config


def source_from_checkpoint(checkpoint: str, what: str = "--checkpoint", resolution=None) -> Source:
  """A diffusion-family checkpoint exports every program; a vae or decoder_distill one exports
  its decoder (its latents scaled by the 1/std the stage measured, as a diffusion model sees)."""
  from md_jax.training import diffusion, diffusion_params, latent_space, trainer

  config = ml_collections.ConfigDict(checkpoints.saved_config(checkpoint, what))
  _, step = checkpoints.resolve_checkpoint(checkpoint, what)
  description = {
    "checkpoint": str(checkpoint),
    "stage": config.stage,
    "step": int(step),
    "config_sha256": config_hash(config),
  }
  if config.stage in LATENT_STAGES:
    latents = ml_collections.ConfigDict(
      {"kind": "vae", "checkpoint": str(checkpoint), "scale": 0.0}
    )
    holder = ml_collections.ConfigDict({"latents": latents, "model": {"in_channels": 0}})
    holder.model.in_channels = config.model.latent_channels
    space = latent_space.build_latent_space(holder)
    resolution = resolution or config.data.resolution
    f, c = space.downsample, config.model.latent_channels
    return Source(
      stage=None, unet_params=None, text_params=None,
      decoder=(space.module, _float32(space.pretrained_params), space.scale),
      latent_shape=lambda r: (r // f, r // f, c), text_dim=None,
      resolution=resolution, description=description,
    )  # fmt: skip
  if config.stage not in DIFFUSION_STAGES:
    raise ValueError(
      f"{what}={checkpoint!r} is a {config.stage!r} checkpoint; export takes one of "
      f"{DIFFUSION_STAGES + LATENT_STAGES}"
    )
  tree, _ = checkpoints.load_state_tree(checkpoint, what)
  stage = diffusion.DiffusionStage(_compute_in_float32(config))
  unet, text, autoencoder = map(_float32, diffusion_params.inference_params(tree, config))
  resolution = resolution or trainer.phases_from_config(config)[-1].resolution
  return _diffusion_source(stage, unet, text, autoencoder, resolution, description)


def _diffusion_source(stage, unet, text, autoencoder, resolution, description) -> Source:
  space = stage.latent_space
  return Source(
    stage=stage, unet_params=unet, text_params=text,
    decoder=(space.module, autoencoder, space.scale), latent_shape=stage.latent_shape,
    text_dim=stage.config.model.text_dim, resolution=resolution, description=description,
  )  # fmt: skip


def source_from_config(config, vae_model, resolution: int, seed: int = 0) -> Source:
  """Random-initialised weights at a config's size (the full-size MobileDiffusion has no trained
  checkpoint here): for size, conversion, parity and latency, which do not depend on the weights.
  Zero-initialised tensors are filled with small noise (`_without_zero_tensors`)."""
  from md_jax.models import vae
  from md_jax.training.diffusion import DiffusionStage
  from md_jax.training.latent_space import LatentSpace

  config = _compute_in_float32(config)
  config.model.in_channels = config.model.out_channels = vae_model.latent_channels
  autoencoder = vae.autoencoder_from_config(vae_model, light=True)
  f = vae.downsample_factor(vae_model)
  stage = DiffusionStage(config, latent_space=LatentSpace(autoencoder, None, 1.0, f))
  keys = jax.random.split(jax.random.key(seed), 3)
  length = tokenizer_lib.CONTEXT_LENGTH
  latents = jnp.zeros((1, *stage.latent_shape(resolution)))
  text = jnp.zeros((1, length, config.model.text_dim))
  tokens = jnp.zeros((1, length), jnp.int32)
  unbox = lambda v: _without_zero_tensors(_float32(nn.meta.unbox(v["params"])))
  unet = unbox(jax.jit(stage.unet.init)(keys[0], latents, jnp.zeros((1,), jnp.int32), text))
  text_params = unbox(jax.jit(stage.text_encoder.init)(keys[1], tokens))
  image = jnp.zeros((1, resolution, resolution, 3))
  ae = unbox(jax.jit(autoencoder.init)(keys[2], image))
  description = {
    "checkpoint": None,
    "weights": f"random init, seed {seed}, zero-initialised tensors filled with N(0, 0.02²)",
    "stage": config.stage,
    "step": 0,
    "config_sha256": config_hash(config),
  }
  return _diffusion_source(stage, unet, text_params, ae, resolution, description)


def _without_zero_tensors(tree, seed: int = 0):
  """Fills the tensors init leaves at zero (biases, and the zero-initialised output convolutions
  that make an untrained UNet's output exactly 0) with N(0, 0.02²): every layer then contributes
  to the output, so comparing runtimes on it checks every layer, not a constant."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and x.size and not x.any():
      return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
    return x

  return jax.tree.map(fill, tree)


def _to_image(decoded):
  """Decoder output in [−1, 1] → float32 RGB in [0, 1] (× 255 and round for 8-bit pixels)."""
  return jnp.clip((decoded + 1.0) * 0.5, 0.0, 1.0)


def build_programs(source: Source, kinds, batches) -> list[Program]:
  """Each requested program kind at each batch size: `fn(weights, *inputs)` with its weights."""
  unknown = sorted(set(kinds) - set(source.kinds))
  if unknown:
    raise ValueError(
      f"--programs: {unknown} not exportable from a {source.description['stage']!r} checkpoint "
      f"(it has {list(source.kinds)})"
    )
  stage = source.stage
  module, ae_params, scale = source.decoder
  length = tokenizer_lib.CONTEXT_LENGTH

  def decode(weights, latents):
    if module is None:  # a pixel-space model: its "latents" are the image
      return _to_image(latents / scale)
    decoded = module.apply({"params": weights}, latents / scale, method=type(module).decode)
    return _to_image(decoded)

  def encode_text(weights, token_ids):
    return stage.text_encoder.apply({"params": weights}, token_ids).last_hidden_state

  def unet(weights, latents, timestep, text_embeddings, x0_estimate=None):
    return stage.unet.apply(
      {"params": weights}, latents, timestep, text_embeddings, x0_estimate=x0_estimate
    )

  def one_step(weights, token_ids, noise):
    text = encode_text(weights["text_encoder"], token_ids)
    latents = samplers.ufogen_sample(
      lambda x, t: unet(weights["unet"], x, t, text),
      stage.schedule, noise, 1, prediction=stage.prediction,
    )  # fmt: skip
    return decode(weights["decoder"], latents)

  weights = {
    "text_encoder": source.text_params,
    "unet": source.unet_params,
    "decoder": ae_params,
  }
  weights["one_step"] = dict(weights)
  h, w, c = source.latent_shape(source.resolution)
  r = source.resolution
  programs = []
  for kind in kinds:
    for b in batches:
      latents = TensorSpec("latents", (b, h, w, c), "float32")
      tokens = TensorSpec("token_ids", (b, length), "int32")
      image = TensorSpec("image", (b, r, r, 3), "float32")
      if kind == "text_encoder":
        text = TensorSpec("text_embeddings", (b, length, source.text_dim), "float32")
        fn, ins, outs = encode_text, (tokens,), (text,)
      elif kind == "unet":
        text = TensorSpec("text_embeddings", (b, length, source.text_dim), "float32")
        step = TensorSpec("timestep", (b,), "int32")
        fn, ins = unet, (latents, step, text)
        if stage.unet.self_condition:  # the app's sampler feeds back the previous step's x̂_0
          ins += (dataclasses.replace(latents, name="x0_estimate"),)
        outs = (TensorSpec("prediction", latents.shape, "float32"),)
      elif kind == "decoder":
        fn, ins, outs = decode, (latents,), (image,)
      else:
        fn, ins, outs = one_step, (tokens, dataclasses.replace(latents, name="noise")), (image,)
      programs.append(Program(f"{kind}_b{b}", kind, b, fn, weights[kind], ins, outs))
  return programs


def reference_inputs(program: Program, source: Source, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic, realistic inputs: a real caption's tokens (and the empty prompt's in the
  second row, as classifier-free guidance batches them), unit Gaussian latents and noise, a
  mid-schedule timestep, and text embeddings from the text encoder when there is one."""
  rng = np.random.default_rng(seed)
  inputs = {}
  for spec in program.inputs:
    if spec.name == "token_ids":
      prompts = ["a large red circle left of a small blue square", ""]
      prompts = (prompts * spec.shape[0])[: spec.shape[0]]
      inputs[spec.name] = tokenizer_lib.tokenize(source.stage.tokenizer, prompts).astype(np.int32)
    elif spec.name == "timestep":
      inputs[spec.name] = np.full(spec.shape, source.stage.schedule.num_steps // 2, np.int32)
    elif spec.name == "text_embeddings":
      tokens = np.zeros((spec.shape[0], spec.shape[1]), np.int32)
      tokens[:] = tokenizer_lib.tokenize(source.stage.tokenizer, ["a small green triangle"])[0]
      params = {"params": source.text_params}
      out = jax.jit(source.stage.text_encoder.apply)(params, tokens).last_hidden_state
      inputs[spec.name] = np.asarray(out, np.float32)
    else:
      inputs[spec.name] = rng.standard_normal(spec.shape, np.float32)
  return inputs

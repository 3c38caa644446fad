"""The programs a phone runs: pure functions of the trained weights and the inputs.

  text_encoder  token_ids (B, 77) int32 → text_embeddings (B, 77, D)
  unet          latents (B, h, w, c), timestep (B,) int32, text_embeddings [, x0_estimate of a
                self-conditioned UNet] [, guidance (B,) float32 of a distilled student]
                → prediction (B, h, w, c)
  decoder       latents (B, h, w, c) → image (B, H, W, 3) float32 in [0, 1]
  one_step      token_ids, noise (B, h, w, c) → image: text encoder → one UNet call at t = T−1
                (UFOGen's sampler, paper Sec. 4) → light decoder, fused in one program
  one_step_control  token_ids, noise, condition (B, H, W, k) float32 in [0, 1] → image: the same
                with a control plugin's residuals added to the UNet call (`attachments.py`)

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
from md_jax.infra import checkpoints
from md_jax.pipeline.checkpoint_layout import DIFFUSION_STAGES, InferenceParams
from md_jax.pipeline.latent_space import LatentSpace, build_latent_space
from md_jax.pipeline.text_to_image import TextToImage

PROGRAMS = ("text_encoder", "unet", "decoder", "one_step")
CONTROL_PROGRAM = "one_step_control"  # only with a plugin attached (`attachments.with_plugin`)
LATENT_STAGES = ("vae", "decoder_distill")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  shape: tuple[int, ...]
  dtype: str

  def to_json(self) -> dict:
    return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

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
  """What is exported: the model, its float32 params, and where they came from."""

  pipeline: TextToImage | None  # every program; None: a vae or decoder_distill run (decoder only)
  params: InferenceParams  # float32, on the host (`unet` and `text_encoder` None without a model)
  latent_space: LatentSpace
  latent_channels: int
  resolution: int
  description: dict  # checkpoint, stage, step, config hash: for the manifest
  control: object = None  # an `attachments.Control` plugin: adds the `one_step_control` program

  @property
  def kinds(self) -> tuple[str, ...]:
    if self.pipeline is None:
      return ("decoder",)
    if self.pipeline.unet.guidance_embedding:  # a distilled student: no one-step program
      return tuple(k for k in PROGRAMS if k != "one_step")
    return PROGRAMS + ((CONTROL_PROGRAM,) if self.control is not None else ())

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    return self.latent_space.latent_shape(resolution, self.latent_channels)


def config_hash(config) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _float32(tree):
  """Host arrays, floating ones as float32 (bf16 params would make every weight a bf16 constant)."""

  def cast(x):
    x = np.asarray(x)
    return x.astype(np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, tree)


def source_from_checkpoint(checkpoint: str, what: str = "--checkpoint", resolution=None) -> Source:
  """A diffusion-family checkpoint exports every program; a vae or decoder_distill one exports
  its decoder (its latents scaled by the 1/std the stage measured, as a diffusion model sees)."""
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
    space = build_latent_space(holder)
    params = InferenceParams(None, None, _float32(space.pretrained_params))
    return Source(
      None, params, space, config.model.latent_channels, resolution or config.data.resolution,
      description,
    )  # fmt: skip
  if config.stage not in DIFFUSION_STAGES:
    raise ValueError(
      f"{what}={checkpoint!r} is a {config.stage!r} checkpoint; export takes one of "
      f"{DIFFUSION_STAGES + LATENT_STAGES}"
    )
  pipeline, params, _, _ = TextToImage.from_checkpoint(checkpoint, what=what, dtype="float32")
  return _diffusion_source(pipeline, _float32(params), resolution, description)


def _diffusion_source(pipeline, params, resolution, description) -> Source:
  return Source(
    pipeline, params, pipeline.latent_space, pipeline.latent_channels,
    resolution or pipeline.resolution, description,
  )  # fmt: skip


def source_from_config(config, vae_model, resolution: int, seed: int = 0) -> Source:
  """Random-initialised weights at a config's size (the full-size MobileDiffusion has no trained
  checkpoint here): for size, conversion, parity and latency, which do not depend on the weights.
  Zero-initialised tensors are filled with small noise (`_without_zero_tensors`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dtype = config.text_encoder.dtype = "float32"
  pipeline = TextToImage.untrained(config, vae_model)
  init = jax.jit(lambda key: nn.meta.unbox(pipeline.init_params(jax.random.split(key, 3))))
  params = _without_zero_tensors(_float32(init(jax.random.key(seed))))
  description = {
    "checkpoint": None,
    "weights": f"random init, seed {seed}, zero-initialised tensors filled with N(0, 0.02²)",
    "stage": config.stage,
    "step": 0,
    "config_sha256": config_hash(config),
  }
  return _diffusion_source(pipeline, params, resolution, description)


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
  pipeline = source.pipeline
  length = tokenizer_lib.CONTEXT_LENGTH

  def decode(weights, latents):
    return _to_image(source.latent_space.decode(weights, latents))

  # The UNet's inputs beyond (latents, timestep, text): the app's sampler feeds back the previous
  # step's x̂_0 to a self-conditioned UNet, and gives a distilled student its guidance scale.
  extra_inputs = []
  if pipeline.unet.self_condition:
    extra_inputs.append("x0_estimate")
  if pipeline.unet.guidance_embedding:
    extra_inputs.append("guidance")

  def unet(weights, latents, timestep, text_embeddings, *extra, adapter_features=None):
    return pipeline.unet.apply(
      {"params": weights}, latents, timestep, text_embeddings, **dict(zip(extra_inputs, extra)),
      adapter_features=adapter_features,
    )  # fmt: skip

  def one_step(weights, token_ids, noise, condition=None):
    text = pipeline.encode_text(weights["text_encoder"], token_ids)
    features = None
    if condition is not None:  # [0, 1] → the [−1, 1] the adapter was trained on
      features = source.control.adapter.apply({"params": weights["adapter"]}, condition * 2 - 1)
    latents = samplers.ufogen_sample(
      lambda x, t: unet(weights["unet"], x, t, text, adapter_features=features),
      pipeline.schedule, noise, 1, prediction=pipeline.prediction,
    )  # fmt: skip
    return decode(weights["decoder"], latents)

  weights = {
    "text_encoder": source.params.text_encoder,
    "unet": source.params.unet,
    "decoder": source.params.autoencoder,
  }
  weights["one_step"] = dict(weights)
  if source.control is not None:
    weights[CONTROL_PROGRAM] = {**weights["one_step"], "adapter": source.control.params}
  h, w, c = source.latent_shape(source.resolution)
  r = source.resolution
  programs = []
  for kind in kinds:
    for b in batches:
      latents = TensorSpec("latents", (b, h, w, c), "float32")
      tokens = TensorSpec("token_ids", (b, length), "int32")
      image = TensorSpec("image", (b, r, r, 3), "float32")
      if kind in ("text_encoder", "unet"):
        text = TensorSpec("text_embeddings", (b, length, pipeline.unet.text_dim), "float32")
      if kind == "text_encoder":
        fn, ins, outs = pipeline.encode_text, (tokens,), (text,)
      elif kind == "unet":
        step = TensorSpec("timestep", (b,), "int32")
        fn, ins = unet, (latents, step, text)
        for name in extra_inputs:
          shape = (b,) if name == "guidance" else latents.shape
          ins += (TensorSpec(name, shape, "float32"),)
        outs = (TensorSpec("prediction", latents.shape, "float32"),)
      elif kind == "decoder":
        fn, ins, outs = decode, (latents,), (image,)
      else:
        fn, ins, outs = one_step, (tokens, dataclasses.replace(latents, name="noise")), (image,)
        if kind == CONTROL_PROGRAM:
          ins += (TensorSpec("condition", (b, r, r, source.control.channels), "float32"),)
      programs.append(Program(f"{kind}_b{b}", kind, b, fn, weights[kind], ins, outs))
  return programs


def reference_inputs(program: Program, source: Source, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic, realistic inputs: a real caption's tokens (and the empty prompt's in the
  second row, as classifier-free guidance batches them), unit Gaussian latents and noise, a
  mid-schedule timestep, and text embeddings from the text encoder when there is one."""
  rng = np.random.default_rng(seed)
  pipeline = source.pipeline
  inputs = {}
  for spec in program.inputs:
    if spec.name == "token_ids":
      prompts = ["a large red circle left of a small blue square", ""]
      prompts = (prompts * spec.shape[0])[: spec.shape[0]]
      inputs[spec.name] = tokenizer_lib.tokenize(pipeline.tokenizer, prompts).astype(np.int32)
    elif spec.name == "timestep":
      inputs[spec.name] = np.full(spec.shape, pipeline.schedule.num_steps // 2, np.int32)
    elif spec.name == "guidance":  # a distilled student's classifier-free guidance scale
      inputs[spec.name] = np.full(spec.shape, 3.0, np.float32)
    elif spec.name == "condition":  # the plugin's map of a rendered `shapes` scene
      inputs[spec.name] = _reference_condition(source.control.condition, spec.shape, rng)
    elif spec.name == "text_embeddings":
      tokens = np.zeros((spec.shape[0], spec.shape[1]), np.int32)
      tokens[:] = tokenizer_lib.tokenize(pipeline.tokenizer, ["a small green triangle"])[0]
      out = jax.jit(pipeline.encode_text)(source.params.text_encoder, tokens)
      inputs[spec.name] = np.asarray(out, np.float32)
    else:
      inputs[spec.name] = rng.standard_normal(spec.shape, np.float32)
  return inputs


def _reference_condition(kind: str, shape, rng) -> np.ndarray:
  """(B, H, W, k) float32 in [0, 1]: `kind` maps of rendered `shapes` scenes, as an app would
  compute them from a photo (not noise, which a plugin never saw)."""
  from md_jax.data import conditions, shapes_scene

  b, r = shape[0], shape[1]
  maps = [conditions.compute(kind, shapes_scene.render(shapes_scene.sample_scene(rng), r))
          for _ in range(b)]  # fmt: skip
  return np.stack(maps).astype(np.float32) / 255.0

"""A trained text-to-image model and its samplers, apart from any training stage.

    pipeline, params, step, config = TextToImage.from_checkpoint("workdirs/main/diffusion")
    images = pipeline.generate(params, ["a large red circle on a white background"], seed=0)

`TextToImage` holds the modules and fixed parts of a diffusion-family model: tokenizer, CLIP text
encoder, UNet, latent space, noise schedule and prediction type. Params travel beside it as an
`InferenceParams` pytree, so one pipeline serves a checkpoint's EMA params, an earlier checkpoint
(autoguidance) or random weights (`random_params`, for size and latency). The training stages
hold one too and add only losses and hooks.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from md_jax.data import tokenizer as tokenizer_lib
from md_jax.diffusion import samplers, schedules
from md_jax.infra import checkpoints, phases
from md_jax.models import partitioned
from md_jax.models.clip_weights import read_hf_config
from md_jax.models.text_encoder import CLIPTextEncoder
from md_jax.models.unet import UNet, null_text_embedding
from md_jax.pipeline import checkpoint_layout, inpainting
from md_jax.pipeline.checkpoint_layout import InferenceParams
from md_jax.pipeline.latent_space import LatentSpace, build_latent_space

SAMPLERS = ("ddim", "dpm++", "ufogen")


def text_encoder_from_config(config, tokenizer) -> CLIPTextEncoder:
  """The CLIP text encoder `config.text_encoder` describes: pretrained CLIP's architecture (from
  `path`'s config.json; its weights are the training stage's to load) or a random-init one."""
  te = config.text_encoder
  dtype = jnp.dtype(te.get("dtype", "float32"))
  if te.path:
    return CLIPTextEncoder.from_hf_config(read_hf_config(te.path), dtype=dtype)
  hf_config = {
    "vocab_size": len(tokenizer),
    "hidden_size": te.hidden_size,
    "intermediate_size": te.intermediate_size,
    "num_hidden_layers": te.num_layers,
    "num_attention_heads": te.num_heads,
    "max_position_embeddings": tokenizer_lib.CONTEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "eos_token_id": tokenizer.eos_token_id,
  }
  return CLIPTextEncoder.from_hf_config(hf_config, dtype=dtype)


def as_key(seed):
  """A typed PRNG key from an int seed, a typed key, or a raw uint32 key (`jax.random.PRNGKey`)."""
  if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
    return seed
  if np.ndim(seed):
    return jax.random.wrap_key_data(jnp.asarray(seed, jnp.uint32))
  return jax.random.key(seed)


def to_uint8(images):
  """Decoded images in about [−1, 1] → uint8 pixels."""
  return jnp.clip(jnp.round((images + 1) * 127.5), 0, 255).astype(jnp.uint8)


def check_params_fit(pipeline: "TextToImage", params: InferenceParams, where: str) -> None:
  """The model a checkpoint's saved config builds (`pipeline`) against its arrays (`params`):
  shapes compared abstractly (nothing is computed), so a config that disagrees with the arrays is
  one error naming the parameters, not a flax error inside the first sampling."""
  expected = jax.eval_shape(lambda key: pipeline.init_params(jax.random.split(key, 3)),
                            jax.random.key(0))  # fmt: skip
  expected = nn.meta.unbox(expected)
  problems = []
  for part in ("unet", "text_encoder"):
    found = dict(_shapes(getattr(params, part)))
    wanted = dict(_shapes(getattr(expected, part)))
    differ = [f"{p} is {found[p]} there, {wanted[p]} by the config"
              for p in wanted if p in found and found[p] != wanted[p]]  # fmt: skip
    missing = [p for p in wanted if p not in found]
    extra = [p for p in found if p not in wanted]
    for kind, items in (("shape mismatch", differ), ("missing", missing), ("unexpected", extra)):
      if items:
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        problems.append(f"{part} {kind} ({len(items)}): {', '.join(items[:3])}{more}")
  if problems:
    raise checkpoints.CheckpointError(
      f"{where}: the model its saved config describes does not fit its arrays; "
      + "; ".join(problems)
    )


def _shapes(tree):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield jax.tree_util.keystr(path), tuple(np.shape(leaf))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: `self` is static under jit
class TextToImage:
  tokenizer: Any
  text_encoder: CLIPTextEncoder
  unet: UNet
  latent_space: LatentSpace
  schedule: schedules.NoiseSchedule
  prediction: str  # "eps" or "v"
  latent_channels: int
  resolution: int  # the run's final phase's: what `generate` samples at by default
  null_tokens: jax.Array  # the empty prompt's ids, CFG's unconditional branch without a learned one
  # The DDIM timestep grid (`samplers.ddim_timesteps`): "trailing" for a step-distilled student,
  # whose N steps are the jumps it was trained to make.
  timestep_spacing: str = "linspace"

  @classmethod
  def from_config(cls, config, *, tokenizer=None, latent_space=None) -> "TextToImage":
    """The model a diffusion-family config describes. `latent_space` replaces the one
    `config.latents` names (e.g. a random-init light decoder, where no checkpoint exists)."""
    tokenizer = tokenizer or tokenizer_lib.load_tokenizer(*tokenizer_lib.tokenizer_dir_of(config))
    return cls(
      tokenizer=tokenizer,
      text_encoder=text_encoder_from_config(config, tokenizer),
      unet=UNet.from_config(config.model),
      latent_space=latent_space or build_latent_space(config),
      schedule=schedules.from_config(config.schedule),
      prediction=config.prediction,
      latent_channels=config.model.in_channels,
      resolution=phases.final_resolution(config),
      null_tokens=jnp.asarray(tokenizer_lib.tokenize(tokenizer, [""])[0]),
      timestep_spacing=config.get("timestep_spacing", "linspace"),
    )

  @classmethod
  def untrained(cls, config, vae_model) -> "TextToImage":
    """The model of a diffusion config with `vae_model`'s light decoder as its latent space
    (scale 1), for random weights (`init_params`): what size, latency and export checks of the
    full-size model run, where no trained checkpoint exists."""
    from md_jax.models import vae

    config = config.copy_and_resolve_references()
    config.model.in_channels = config.model.out_channels = vae_model.latent_channels
    autoencoder = vae.autoencoder_from_config(vae_model, light=True)
    space = LatentSpace(autoencoder, None, 1.0, vae.downsample_factor(vae_model))
    return cls.from_config(config, latent_space=space)

  @classmethod
  def from_checkpoint(cls, path: str, *, what: str = "--checkpoint", dtype=None):
    """(pipeline, params, step, config) of a diffusion-family checkpoint (diffusion,
    relu_finetune, ufogen; a LoRA run's factors merged): the EMA params, on the host. `dtype`
    (e.g. "float32") overrides the dtype the config computed in."""
    config, tree, step = checkpoints.open_checkpoint(path, what, checkpoint_layout.DIFFUSION_STAGES)
    params = checkpoint_layout.inference_params(tree, config, f"{what}={path!r}")
    if dtype is not None:
      config = config.copy_and_resolve_references()
      config.model.dtype = config.text_encoder.dtype = str(jnp.dtype(dtype))
    pipeline = cls.from_config(config)
    check_params_fit(pipeline, params, f"{what}={path!r}")
    return pipeline, params, step, config

  def weights_in_compute_dtype(self, params: InferenceParams) -> InferenceParams:
    """The UNet's and text encoder's weights cast to the dtype each computes in (after any LoRA
    is merged). For bf16 inference on a CPU: with float32 weights every call converts all of
    them, 40 % of a bf16 forward of the 220M-parameter UNet (BENCHMARKS.md, issue 46)."""
    cast = lambda tree, dtype: jax.tree.map(lambda x: x.astype(dtype), tree)
    return params.replace(
      unet=cast(params.unet, self.unet.dtype),
      text_encoder=cast(params.text_encoder, self.text_encoder.dtype),
    )

  def latent_shape(self, resolution: int) -> tuple[int, int, int]:
    return self.latent_space.latent_shape(resolution, self.latent_channels)

  def init_params(self, keys, resolution: int | None = None) -> InferenceParams:
    """Random params, boxed with their logical axes, from three keys (UNet, text encoder,
    autoencoder); traceable, so a sharded init never materialises them on one device."""
    k_unet, k_text, k_ae = keys
    res = resolution or self.resolution
    latents = jnp.zeros((1, *self.latent_shape(res)))
    tokens = jnp.zeros((1, tokenizer_lib.CONTEXT_LENGTH), jnp.int32)
    text = jnp.zeros((1, tokenizer_lib.CONTEXT_LENGTH, self.unet.text_dim))
    guidance = {"guidance": jnp.ones((1,))} if self.unet.guidance_embedding else {}
    unet = self.unet.init(k_unet, latents, jnp.zeros((1,), jnp.int32), text, **guidance)["params"]
    text_encoder = self.text_encoder.init(k_text, tokens)["params"]
    autoencoder = {}
    if self.latent_space.module is not None:
      autoencoder = self.latent_space.module.init(k_ae, jnp.zeros((1, res, res, 3)))["params"]
    return InferenceParams(unet=unet, text_encoder=text_encoder, autoencoder=autoencoder)

  def placeholder_params(self, resolution: int | None = None) -> InferenceParams:
    """`init_params`' tree (boxed, the same shapes and logical axes) as zeros, for a stage whose
    `initialize_from` puts in every one of these leaves from its init checkpoint (strictly)."""
    return partitioned.zeros_of_init(
      lambda: self.init_params(jax.random.split(jax.random.key(0), 3), resolution)
    )

  def tokenize(self, prompts) -> np.ndarray:
    """Token ids (N, 77); a prompt longer than the text encoder's context is truncated, with a
    warning."""
    for prompt in prompts:
      length = len(self.tokenizer(prompt)["input_ids"])
      if length > tokenizer_lib.CONTEXT_LENGTH:
        logging.warning(
          "prompt %r is %d tokens; truncated to %d", prompt, length, tokenizer_lib.CONTEXT_LENGTH
        )
    return tokenizer_lib.tokenize(self.tokenizer, prompts)

  def encode_text(self, text_params, tokens):
    return self.text_encoder.apply({"params": text_params}, tokens).last_hidden_state

  def null_text(self, unet_params, text_params, batch: int):
    """The unconditional text of classifier-free guidance for `batch` captions: the UNet's
    learned null embedding when it has one, else the encoded empty prompt (as in SD)."""
    if self.unet.learned_null_text:
      return null_text_embedding(unet_params, batch)
    null_tokens = jnp.broadcast_to(self.null_tokens, (batch, *self.null_tokens.shape))
    return self.encode_text(text_params, null_tokens)

  def denoiser(self, unet_params, text, guidance=None, adapter_features=None):
    """(x, t[, x̂_0 of the previous step]) → the UNet's prediction for the encoded `text`
    (`guidance`: the scale a guidance-conditioned UNet predicts the guided output at;
    `adapter_features`: a control plugin's residuals, `pipeline/control.py`)."""
    extra = {} if guidance is None else {"guidance": guidance}
    if adapter_features is not None:
      extra["adapter_features"] = adapter_features
    return lambda x, t, *x0_estimate: self.unet.apply(
      {"params": unet_params}, x, t, text, x0_estimate=x0_estimate[0] if x0_estimate else None,
      **extra,
    )  # fmt: skip

  def generate(
    self, params: InferenceParams, prompts_or_tokens, *, seed=0, resolution=None,
    sampler="ddim", steps=50, cfg=3.0, eta=0.0, guide=None, classifier_guide=None, control=None,
    inpaint=None,
  ):  # fmt: skip
    """uint8 images (N, resolution, resolution, 3) for prompts (strings) or token ids (N, 77),
    one compiled program per setting.

    `seed`: an int, or a key (e.g. folded per batch). `sampler`: "ddim" or "dpm++" (classifier-
    free guidance at scale `cfg`; 1 = none; a guidance-conditioned UNet, a step-distilled
    student, takes `cfg` as its input and runs once per step), or "ufogen" (`steps` one-step
    generator calls, no guidance). `eta`: DDIM's fresh-noise share (0 deterministic, 1
    DDPM-like), for "ddim" only.
    `guide`: the `InferenceParams` of a weaker model of this architecture (e.g. an earlier
    checkpoint of the run): autoguidance at scale `cfg` instead of CFG.
    `classifier_guide`: a `ClassifierGuide` holding each image's asked attributes: its classifier
    guidance is added to whichever of the above.
    `control`: (adapter, adapter params, condition maps (N, H, W, C)), a control plugin
    (`pipeline/control.py`) whose residuals every UNet call adds, both CFG branches included.
    `inpaint`: an `inpainting.Inpaint` (images and masks of the region to repaint): the rest of
    each image is kept, every sampler, without training (`pipeline/inpainting.py`).
    """
    if not len(prompts_or_tokens):
      raise ValueError("generate: no prompts")
    if isinstance(prompts_or_tokens[0], str):
      prompts_or_tokens = self.tokenize(prompts_or_tokens)
    resolution = resolution or self.resolution
    features = None
    if control is not None:
      from md_jax.pipeline.control import adapter_features

      features = adapter_features(control, len(prompts_or_tokens), resolution)
    known = None
    if inpaint is not None:
      inpaint.check(len(prompts_or_tokens), resolution)
      images = jnp.asarray(inpaint.images, jnp.float32) / 127.5 - 1.0
      known = (
        self.latent_space.encode(params.autoencoder, images),
        inpainting.latent_keep_mask(inpaint.masks, self.latent_space.downsample),
      )
    return self._generate(
      params, jnp.asarray(prompts_or_tokens), as_key(seed),
      resolution=resolution, sampler=sampler, steps=steps, cfg=cfg, eta=eta,
      guide=guide, classifier_guide=classifier_guide, adapter_features=features, known=known,
    )  # fmt: skip

  @functools.partial(
    jax.jit, static_argnums=0, static_argnames=("resolution", "sampler", "steps", "cfg", "eta")
  )
  def _generate(
    self, params, tokens, key, *, resolution, sampler, steps, cfg, eta, guide, classifier_guide,
    adapter_features=None, known=None,
  ):  # fmt: skip
    if sampler not in SAMPLERS:
      raise ValueError(f"sampler {sampler!r}: expected one of {SAMPLERS}")
    if eta != 0.0 and sampler != "ddim":
      raise ValueError(f"eta={eta} is DDIM's; sampler {sampler!r} takes no eta")
    if (guide is not None or classifier_guide is not None) and sampler == "ufogen":
      raise ValueError("guidance is for the ddim and dpm++ samplers; ufogen takes none")
    text = self.encode_text(params.text_encoder, tokens)
    x_T = jax.random.normal(key, (len(tokens), *self.latent_shape(resolution)))
    if classifier_guide is not None and x_T.shape[1:] != classifier_guide.latent_shape:
      raise ValueError(
        f"the latent classifier reads {classifier_guide.latent_shape} latents, and resolution "
        f"{resolution} gives {x_T.shape[1:]}: generate at the resolution it was trained at"
      )
    self_condition = self.unet.self_condition
    keep_known = lambda fn: (
      fn if known is None else inpainting.keep_known(fn, self.schedule, self.prediction, *known)
    )
    if sampler == "ufogen":
      latents = samplers.ufogen_sample(
        keep_known(self.denoiser(params.unet, text, adapter_features=adapter_features)),
        self.schedule, x_T, steps, prediction=self.prediction, rng=key,
        self_condition=self_condition,
      )  # fmt: skip
      return to_uint8(self.latent_space.decode(params.autoencoder, latents))
    if self.unet.guidance_embedding:  # the guided output in one call (Meng et al., 2023)
      if guide is not None:
        raise ValueError("autoguidance needs a UNet without guidance_embedding")
      scale = jnp.full((len(tokens),), cfg, jnp.float32)
      denoise = self.denoiser(params.unet, text, scale, adapter_features)
    elif guide is not None:
      guide_text = self.encode_text(guide.text_encoder, tokens)
      guide_fn = self.denoiser(guide.unet, guide_text, adapter_features=adapter_features)
      good_fn = self.denoiser(params.unet, text, adapter_features=adapter_features)
      denoise = samplers.autoguidance(good_fn, guide_fn, cfg)
    elif cfg == 1.0:
      denoise = self.denoiser(params.unet, text, adapter_features=adapter_features)
    else:
      null = self.null_text(params.unet, params.text_encoder, len(tokens))
      if adapter_features is not None:  # both halves of the 2B batch see the condition
        kw_control = {"adapter_features": tuple(jnp.concatenate([f, f]) for f in adapter_features)}
      else:
        kw_control = {}
      model = lambda x, t, c, **kw: self.unet.apply(
        {"params": params.unet}, x, t, c, **kw, **kw_control
      )
      denoise = samplers.classifier_free_guidance(model, text, null, cfg)
    if classifier_guide is not None:
      denoise = samplers.classifier_guidance(
        denoise, classifier_guide.log_prob, self.schedule, prediction=self.prediction,
        scale=classifier_guide.scale, max_timestep=classifier_guide.max_timestep,
      )  # fmt: skip
    denoise = keep_known(denoise)
    if sampler == "ddim":
      latents = samplers.ddim_sample(
        denoise, self.schedule, x_T, steps, prediction=self.prediction, eta=eta,
        rng=jax.random.fold_in(key, 1), self_condition=self_condition,
        spacing=self.timestep_spacing,
      )  # fmt: skip
    else:
      latents = samplers.dpm_solver_pp_2m_sample(
        denoise, self.schedule, x_T, steps, prediction=self.prediction,
        self_condition=self_condition,
      )  # fmt: skip
    return to_uint8(self.latent_space.decode(params.autoencoder, latents))

"""CLIP image tower and the two-tower CLIP model, numerically matching transformers' CLIPModel.

MobileDiffusion reports CLIP score with OpenCLIP ViT-g/14 (paper, Sec. 5.1); `md_jax.evaluation.
clip_score` reads it through these modules. `CLIPVisionEncoder` is HF `CLIPVisionModel` (patch
conv without bias, class token, learned positions, `pre_layrnorm`, pre-LN blocks without a causal
mask, `post_layernorm` on the class token) and reuses the text tower's `CLIPEncoderLayer`, so one
block implementation serves both towers. `CLIPModel` adds the bias-free projections and
`logit_scale`.

Parameter paths mirror the HF key names (`vision_model/layers_3/mlp/fc1/kernel` <->
`vision_model.encoder.layers.3.mlp.fc1.weight`), so `md_jax.models.clip_weights` converts with a
table. Images are NHWC, as everywhere in md_jax; the patch conv kernel is stored HWIO.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from md_jax.models.text_encoder import (
  _ACTIVATION_AXES,
  CLIPEncoderLayer,
  CLIPTextEncoder,
  _activation,
  _layer_norm,
  _partitioned,
)

# What transformers.CLIPVisionConfig assumes for a key that a config.json omits (ViT-B/32).
HF_VISION_CONFIG_DEFAULTS = {
  "hidden_size": 768,
  "intermediate_size": 3072,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "num_channels": 3,
  "image_size": 224,
  "patch_size": 32,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-5,
}
HF_PROJECTION_DIM_DEFAULT = 512
# HWIO; flax rejects a logical name twice in one array, so only the first tap axis is named (as in
# md_jax.models.partitioned).
_PATCH_KERNEL_AXES = ("conv_kernel", None, None, "embed")
HF_LOGIT_SCALE_INIT = 2.6592  # log(1 / 0.07), CLIP's initial temperature.

# The architecture of `laion/CLIP-ViT-g-14-laion2B-s12B-b42K` (the OpenCLIP ViT-g/14 that the
# paper's CLIP score uses), written from OpenCLIP's `model_configs/ViT-g-14.json` (embed_dim 1024;
# vision width 1408, 40 layers, head_width 88 -> 16 heads, mlp_ratio 4.3637 -> 6144, patch 14,
# image 224; text width 1024, 16 heads, 24 layers, context 77, vocab 49408) and the HF repo's
# config.json as converted by transformers (OpenCLIP's non-OpenAI models use exact GELU, not
# quick_gelu; the original converted configs keep eos_token_id=2, i.e. argmax pooling).
# Architecture keys only; the real weights' own config.json is what the loader reads.
VIT_G_14 = {
  "architectures": ["CLIPModel"],
  "model_type": "clip",
  "projection_dim": 1024,
  "logit_scale_init_value": HF_LOGIT_SCALE_INIT,
  "text_config": {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "projection_dim": 1024,
  },
  "vision_config": {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 40,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 1024,
  },
}


class VisionEncoderOutput(NamedTuple):
  last_hidden_state: jax.Array  # (B, 1 + patches, hidden), before post_layernorm (as in HF).
  pooled_output: jax.Array  # (B, hidden): the class token after post_layernorm.


def _as_dict(config: Any) -> Mapping:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f"expected a config dict or transformers config, got {type(config)}")
  return config


class CLIPVisionEncoder(nn.Module):
  """The CLIP image tower; defaults are openai/clip-vit-base-patch32 (transformers' defaults).

  Input: (B, image_size, image_size, num_channels) normalised pixels (`clip_score.preprocess`).
  """

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_hf_config(cls, config: Any, **overrides) -> "CLIPVisionEncoder":
    """From a `vision_config` dict, a full CLIPModel config.json dict or a transformers config."""
    config = _as_dict(config)
    if isinstance(config.get("vision_config"), Mapping):
      config = config["vision_config"]
    get = lambda key: config[key] if config.get(key) is not None else HF_VISION_CONFIG_DEFAULTS[key]
    fields = dict(
      hidden_size=int(get("hidden_size")),
      intermediate_size=int(get("intermediate_size")),
      num_layers=int(get("num_hidden_layers")),
      num_heads=int(get("num_attention_heads")),
      num_channels=int(get("num_channels")),
      image_size=int(get("image_size")),
      patch_size=int(get("patch_size")),
      hidden_act=str(get("hidden_act")),
      layer_norm_eps=float(get("layer_norm_eps")),
    )
    _activation(fields["hidden_act"])  # Fail at construction, not at the first trace.
    fields.update(overrides)
    return cls(**fields)

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @nn.compact
  def __call__(self, pixel_values: jax.Array, *, train: bool = False) -> VisionEncoderOutput:
    del train  # CLIP has no dropout; accepted so every module is called alike.
    b, h, w, _ = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):
      # HF refuses other sizes too unless asked to interpolate positions, which CLIP score never is.
      raise ValueError(f"image size {h}x{w} does not match the model's {self.image_size}")
    patches = nn.Conv(
      self.hidden_size,
      (self.patch_size, self.patch_size),
      strides=(self.patch_size, self.patch_size),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=_partitioned(
        nn.initializers.lecun_normal(), ("conv_kernel", None, None, "embed")
      ),
      name="patch_embedding",
    )(pixel_values.astype(self.dtype))
    # Row-major patch order, as torch's flatten(2) of an NCHW conv output.
    patches = patches.reshape(b, -1, self.hidden_size)
    class_embedding = self.param(
      "class_embedding",
      _partitioned(nn.initializers.normal(0.02), ("embed",)),
      (self.hidden_size,),
      self.param_dtype,
    )
    position_embedding = self.param(
      "position_embedding",
      _partitioned(nn.initializers.normal(0.02), ("length", "embed")),
      (self.num_positions, self.hidden_size),
      self.param_dtype,
    )
    cls_token = jnp.broadcast_to(jnp.asarray(class_embedding, self.dtype), (b, 1, self.hidden_size))
    x = jnp.concatenate([cls_token, patches], axis=1) + jnp.asarray(position_embedding, self.dtype)
    ln = lambda name: _layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name)
    x = nn.with_logical_constraint(ln("pre_layrnorm")(x), _ACTIVATION_AXES)  # HF's spelling.
    for i in range(self.num_layers):
      x = CLIPEncoderLayer(
        self.num_heads,
        self.intermediate_size,
        self.hidden_act,
        self.layer_norm_eps,
        self.dtype,
        self.param_dtype,
        causal=False,
        name=f"layers_{i}",
      )(x)
    pooled = ln("post_layernorm")(x[:, 0])
    return VisionEncoderOutput(last_hidden_state=x, pooled_output=pooled)


def _projection(features, dtype, param_dtype, name):
  return nn.Dense(
    features,
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=_partitioned(nn.initializers.lecun_normal(), ("embed", None)),
    name=name,
  )


class CLIPModel(nn.Module):
  """Both towers and their projections into the shared embedding space (HF `CLIPModel`).

  Embeddings come back unnormalised, like HF's `get_image_features` / `get_text_features`;
  the cosine is the caller's (`clip_score`), so the features stay comparable with transformers.
  """

  text_model: CLIPTextEncoder
  vision_model: CLIPVisionEncoder
  projection_dim: int = HF_PROJECTION_DIM_DEFAULT
  logit_scale_init: float = HF_LOGIT_SCALE_INIT

  @classmethod
  def from_hf_config(cls, config: Any, **overrides) -> "CLIPModel":
    """From a CLIPModel config.json dict (or transformers CLIPConfig); `overrides` (e.g. `dtype`)
    go to both towers."""
    config = _as_dict(config)
    projection_dim = config.get("projection_dim") or HF_PROJECTION_DIM_DEFAULT
    return cls(
      text_model=CLIPTextEncoder.from_hf_config(config.get("text_config") or {}, **overrides),
      vision_model=CLIPVisionEncoder.from_hf_config(config.get("vision_config") or {}, **overrides),
      projection_dim=int(projection_dim),
      logit_scale_init=float(config.get("logit_scale_init_value", HF_LOGIT_SCALE_INIT)),
    )

  def setup(self):
    text, vision = self.text_model, self.vision_model
    self.text_projection = _projection(
      self.projection_dim, text.dtype, text.param_dtype, "text_projection"
    )
    self.visual_projection = _projection(
      self.projection_dim, vision.dtype, vision.param_dtype, "visual_projection"
    )
    self.logit_scale = self.param(
      "logit_scale",
      _partitioned(nn.initializers.constant(self.logit_scale_init), ()),
      (),
      jnp.float32,
    )

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixel_values).pooled_output)

  def text_features(self, input_ids: jax.Array) -> jax.Array:
    """Pooled (EOS) text state, projected. No attention mask: the causal mask already hides the
    padding after EOS, which is the only state pooled, so a mask would not change the output."""
    return self.text_projection(self.text_model(input_ids).pooled_output)

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array):
    """Both features; used to init every param at once."""
    return self.image_features(pixel_values), self.text_features(input_ids)


def abstract_clip_params(model: CLIPModel):
  """Shapes, dtypes and logical axes of every CLIPModel param, without allocating them."""
  vision = model.vision_model
  pixels = jax.ShapeDtypeStruct(
    (1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32
  )
  ids = jax.ShapeDtypeStruct((1, model.text_model.max_length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), pixels, ids)["params"]

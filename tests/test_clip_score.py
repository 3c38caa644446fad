"""CLIP score: the two-tower CLIP in Flax against transformers' PyTorch CLIPModel, the on-device
preprocessing against the HF image processor, the ViT-g/14 layout, and checkpoint errors.

A tiny random CLIPModel is saved by transformers itself and read back through our loader, so the
key names, layouts and config handling are transformers', not a copy of our own assumptions.
"""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from md_jax.data import tokenizer
from md_jax.evaluation import clip_score
from md_jax.evaluation.clip_score import CLIPScorer
from md_jax.models import clip_weights
from md_jax.models.clip_vision import VIT_G_14, CLIPModel, abstract_clip_params

torch = pytest.importorskip("torch", reason="the reference is transformers' PyTorch CLIPModel")

IMAGE_SIZE = 32
CAPTIONS = ["a red circle", "two blue squares on the left", "a small green triangle", "nothing"]


def _tiny_config(words) -> dict:
  # The shipped `shapes` vocabulary feeds the text tower, as a real run's tokenizer would.
  return dict(
    projection_dim=16,
    text_config=dict(
      vocab_size=len(words),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=77,
      hidden_act="gelu",
      bos_token_id=words.bos_token_id,
      pad_token_id=words.pad_token_id,
      eos_token_id=words.eos_token_id,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=IMAGE_SIZE,
      patch_size=8,
      hidden_act="quick_gelu",
    ),
  )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(transformers CLIPModel, its directory, token ids): random weights, LayerNorms and biases
  included (HF's identity init would hide a swapped or dropped tensor)."""
  words = tokenizer.load_tokenizer()
  model = transformers.CLIPModel(transformers.CLIPConfig(**_tiny_config(words))).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = p.shape[-1] ** -0.5 if p.ndim >= 2 and "embedding" not in name else 0.2
      offset = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
      p.copy_(torch.randn(p.shape, generator=gen) * scale + offset)
  path = tmp_path_factory.mktemp("clip_model")
  model.save_pretrained(path, safe_serialization=True)
  return model, path, tokenizer.tokenize(words, CAPTIONS)


@pytest.fixture(scope="module")
def scorer(reference):
  return CLIPScorer.from_pretrained(reference[1])


def _images(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _processor_pixels(images: np.ndarray) -> np.ndarray:
  """What HF's processor makes of the images, NHWC float32. The PIL backend is the reference
  that torchvision's uint8 path copies, and it needs no torchvision."""
  processor = transformers.CLIPImageProcessorPil(
    size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
  )
  pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
  return np.asarray(pixels, np.float32).transpose(0, 2, 3, 1)


def _features(output) -> np.ndarray:
  # transformers 5 returns a ModelOutput whose pooler_output is the projected feature.
  return getattr(output, "pooler_output", output).detach().numpy()


def _torch_features(model, pixels_nhwc, ids):
  with torch.no_grad():
    image = model.get_image_features(pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)))
    text = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long))
  return _features(image), _features(text)


def test_embeddings_and_score_match_transformers(reference, scorer):
  model, _, ids = reference
  # Images already at image_size: preprocessing is then x / 255 and mean/std only, so any
  # difference comes from the towers.
  images = _images((len(ids), IMAGE_SIZE, IMAGE_SIZE, 3))
  ref_image, ref_text = _torch_features(model, _processor_pixels(images), ids)
  image, text = np.asarray(scorer.image_embeds(images)), np.asarray(scorer.text_embeds(ids))
  # Max abs difference over all features (which are O(1): max |feature| ~ 3).
  assert np.abs(image - ref_image).max() <= 1e-5, np.abs(image - ref_image).max()
  assert np.abs(text - ref_text).max() <= 1e-5, np.abs(text - ref_text).max()

  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  ref_cosine = (unit(ref_image) * unit(ref_text)).sum(-1)
  cosine = np.asarray(scorer.score(images, ids))
  assert cosine.shape == (len(ids),)
  np.testing.assert_allclose(cosine, ref_cosine, atol=1e-6)
  # torchmetrics' CLIPScore per pair, and the paper's raw cosine.
  np.testing.assert_allclose(
    clip_score.torchmetrics_clip_score(cosine), 100 * np.maximum(ref_cosine, 0), atol=1e-4
  )
  np.testing.assert_allclose(clip_score.paper_clip_score(cosine), ref_cosine, atol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    scorer.score(images.astype(np.float32), ids)


def test_preprocessing_matches_the_hf_processor_on_odd_sizes(scorer):
  # Noise is the hardest case for a resize (bicubic overshoot everywhere); one image shrinks
  # (odd sides, long-side truncation, off-centre crop), one grows.
  level = 1 / 255 / min(clip_score.OPENAI_CLIP_STD)  # One uint8 step, normalised: 0.0150.
  for shape in ((2, 45, 73, 3), (1, 27, 21, 3)):
    images = _images(shape, seed=1)
    ours = np.asarray(scorer.preprocess(images))
    diff = np.abs(ours - _processor_pixels(images))
    # PIL's 22-bit fixed-point weights flip an occasional rounding; nothing else differs.
    assert diff.max() <= level + 1e-6, (shape, diff.max())
    assert (diff > 1e-5).mean() < 1e-3, (shape, (diff > 1e-5).mean())


# openai/clip-vit-large-patch14's architecture (quick_gelu), for the layout check below.
VIT_L_14 = dict(
  projection_dim=768,
  text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
  vision_config=dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
  ),
)


@pytest.mark.parametrize(
  "config, parameters",
  [
    (VIT_G_14, 1_366_678_273),  # OpenCLIP ViT-g/14, the paper's CLIP score.
    (VIT_L_14, 427_616_513),
    ({}, 151_277_313),  # transformers' defaults: ViT-B/32.
  ],
  ids=["vit_g14", "vit_l14", "vit_b32"],
)
def test_layout_matches_transformers(config, parameters):
  with torch.device("meta"):  # Up to 1.37B parameters, none allocated.
    reference = transformers.CLIPModel(transformers.CLIPConfig(**config))
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  model = CLIPModel.from_hf_config(config)
  assert clip_weights.hf_shapes(model) == expected
  assert sum(int(np.prod(s)) for s in expected.values()) == parameters
  acts = (model.vision_model.hidden_act, model.text_model.hidden_act)
  assert acts == (("gelu", "gelu") if config is VIT_G_14 else ("quick_gelu", "quick_gelu"))


def test_every_param_is_logically_partitioned(reference):
  model = CLIPModel.from_hf_config(json.loads((reference[1] / "config.json").read_text()))
  leaves = jax.tree.leaves(
    abstract_clip_params(model), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_random_init_from_config_scores(reference):
  config = json.loads((reference[1] / "config.json").read_text())
  scorer = CLIPScorer.from_config(config, seed=1)
  cosine = np.asarray(scorer.score(_images((4, IMAGE_SIZE, IMAGE_SIZE, 3)), reference[2]))
  assert cosine.shape == (4,) and np.all(np.abs(cosine) <= 1 + 1e-6)


def _rewrite(src, dst, edit):
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  state = load_file(src / "model.safetensors")
  edit(state)
  save_file(state, str(dst / "model.safetensors"))
  return dst


def test_missing_or_mismatched_weights_raise_one_error_naming_them(reference, tmp_path):
  src = reference[1]

  def break_vision(state):
    del state["visual_projection.weight"]
    state["vision_model.embeddings.patch_embedding.weight"] = np.zeros((32, 3, 4, 4), np.float32)

  path = _rewrite(src, tmp_path / "vision", break_vision)
  with pytest.raises(ValueError) as error:
    CLIPScorer.from_pretrained(path)
  message = str(error.value)
  assert str(path / "model.safetensors") in message
  assert "missing (1)" in message and "visual_projection.weight (16, 32)" in message
  line = next(ln for ln in message.splitlines() if "patch_embedding" in ln)
  assert "(32, 3, 4, 4)" in line and "(32, 3, 8, 8)" in line

  # The text tower's problems are named by the text loader, with the file.
  path = _rewrite(src, tmp_path / "text", lambda s: s.pop("text_model.final_layer_norm.bias"))
  with pytest.raises(ValueError, match=r"(?s)model\.safetensors.*text_model.final_layer_norm"):
    CLIPScorer.from_pretrained(path)

  text_only = tmp_path / "text_only"
  text_only.mkdir()
  (text_only / "config.json").write_text(
    json.dumps(_tiny_config(tokenizer.load_tokenizer())["text_config"])
  )
  with pytest.raises(ValueError, match=r"config\.json has no vision_config"):
    CLIPScorer.from_pretrained(text_only)


def test_sharded_load_scores_like_unsharded(reference, scorer):
  from jax.sharding import PartitionSpec

  from md_jax.infra import sharding

  mesh = sharding.create_mesh((2, 4))
  rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
  sharded = CLIPScorer.from_pretrained(reference[1], mesh=mesh, logical_axis_rules=rules)
  fc1 = sharded.params["vision_model"]["layers_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == PartitionSpec("fsdp", None)  # ("embed", "mlp") under FSDP.
  images, ids = _images((8, IMAGE_SIZE, IMAGE_SIZE, 3), seed=2), np.tile(reference[2], (2, 1))
  np.testing.assert_allclose(sharded.score(images, ids), scorer.score(images, ids), atol=1e-6)

"""FID pieces against their references: the Flax InceptionV3 against pytorch-fid's network (same
random weights, through the converter and loader), the Fréchet distance against pytorch-fid's and
a direct eigenvalue formula, streaming statistics against one-shot ones, the resize against PIL."""

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from scipy import linalg

from md_jax.evaluation import fid
from md_jax.models import inception
from md_jax.tools import convert_inception

torch = pytest.importorskip("torch")

pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402
from torchvision.models.inception import Inception3  # noqa: E402


def _random_fid_state(images_m1_1: np.ndarray, monkeypatch) -> dict:
  """A random state dict with pytorch-fid's keys. BatchNorm statistics are first measured on the
  images (so activations stay O(1) through 94 layers rather than vanishing) and then perturbed,
  so that a loader dropping or mixing up any of the four BN entries would change the features."""
  torch.manual_seed(0)
  template = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
  monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: template)
  net = pytorch_fid_inception.fid_inception_v3()
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = 1.0  # running statistics := this batch's
  net.train()
  with torch.no_grad():
    net(torch.from_numpy(images_m1_1).permute(0, 3, 1, 2))
  g = torch.Generator().manual_seed(1)
  state = net.state_dict()
  for key, value in state.items():
    noise = torch.randn(value.shape, generator=g) if value.is_floating_point() else None
    if key.endswith("running_mean"):
      value += 0.2 * noise * state[key.replace("running_mean", "running_var")].sqrt()
    elif key.endswith("running_var"):
      value *= torch.exp(0.3 * noise)
    elif key.endswith("bn.weight"):
      value.copy_(1.0 + 0.2 * noise)
    elif key.endswith("bn.bias"):
      value.copy_(0.2 * noise)
  return state


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  # Smooth structure plus noise: random weights see more than flat noise statistics.
  yy, xx = np.mgrid[:299, :299] / 299.0
  base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
  scale = rng.uniform(40, 120, size=(3, 1, 1, 1))
  noisy = 127.5 + scale * base[None] + rng.normal(0, 25, size=(3, 299, 299, 3))
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def torch_reference(images, tmp_path_factory):
  """(features from pytorch-fid's InceptionV3, path of the .pth holding its weights)."""
  torch.set_num_threads(1)
  scaled = images.astype(np.float32) / 255.0
  pth = tmp_path_factory.mktemp("inception") / "fid_inception.pth"
  with pytest.MonkeyPatch.context() as monkeypatch:
    torch.save(_random_fid_state(scaled * 2 - 1, monkeypatch), pth)
    # pytorch-fid's own network, reading the saved file where it would download the real one.
    load = lambda *a, **k: torch.load(pth, weights_only=True)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", load)
    model = pytorch_fid_inception.InceptionV3(
      [3], resize_input=False, normalize_input=True, use_fid_inception=True
    ).eval()
  with torch.no_grad():
    (pool3,) = model(torch.from_numpy(scaled).permute(0, 3, 1, 2))
  return pool3[:, :, 0, 0].numpy().astype(np.float64), pth


def test_features_match_pytorch_fid(images, torch_reference, tmp_path):
  expected, pth = torch_reference
  weights = tmp_path / "fid_inception.safetensors"
  convert_inception.convert_file(str(pth), str(weights))
  features = fid.InceptionFeatures.from_file(str(weights))(images)
  assert features.shape == (3, inception.FEATURE_DIM)
  assert expected.std() > 0.1 * np.abs(expected).mean() > 0, "degenerate reference features"
  # Relative to the largest feature: max |ours − pytorch-fid| / max |pytorch-fid|.
  error = np.abs(features - expected).max() / np.abs(expected).max()
  assert error < 1e-4, error


def test_random_params_have_the_loaded_shapes():
  shapes = jax.eval_shape(inception.random_params, jax.random.key(0))
  paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
  expected = inception.expected_torch_shapes()
  assert len(paths) == len(expected) == 94 * 5
  for key_path, leaf in paths:
    path = tuple(k.key for k in key_path)
    torch_shape = expected[inception.torch_key(path)]
    assert leaf.shape == (
      (*torch_shape[2:], torch_shape[1], torch_shape[0]) if path[-1] == "kernel" else torch_shape
    )


def _valid_file_entries() -> dict[str, np.ndarray]:
  return {k: np.zeros(s, np.float32) for k, s in inception.expected_torch_shapes().items()}


def test_bad_weights_file_names_file_and_key(tmp_path):
  entries = _valid_file_entries()
  del entries["Mixed_6c.branch7x7_2.bn.running_var"]
  path = tmp_path / "missing.safetensors"
  save_file(entries, str(path))
  with pytest.raises(ValueError, match=r"missing\.safetensors: missing key 'Mixed_6c\.branch7x7_2"):
    inception.load_inception(str(path))

  entries = _valid_file_entries()
  entries["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
  path = tmp_path / "shape.safetensors"
  save_file(entries, str(path))
  with pytest.raises(ValueError, match=r"shape\.safetensors: key 'Mixed_7c\.branch_pool\.conv"):
    inception.load_inception(str(path))

  with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
    inception.load_inception(str(tmp_path / "nowhere.safetensors"))


def test_converter_rejects_torchvision_imagenet_weights():
  state = {"fc.weight": np.zeros((1000, 2048), np.float32)}
  with pytest.raises(ValueError, match="1000 classes"):
    convert_inception.convert(state)


def _pil_clean_resize(image: np.ndarray) -> np.ndarray:
  """clean-fid's "clean" resizer, written out: per channel, float PIL bicubic, clip, no rounding."""
  channels = [
    np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((299, 299), 3))
    for c in range(image.shape[-1])
  ]
  return np.clip(np.stack(channels, -1), 0, 255)


@pytest.mark.parametrize("shape", [(512, 512), (256, 192), (32, 32), (64, 80), (299, 299)])
def test_resize_matches_pil_float_bicubic(shape):
  image = np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
  ours = np.asarray(fid.resize_clean(image[None]))[0]
  # Float32 on device against PIL's float32 output: a couple of ulps at 255 (~3e-5 each).
  np.testing.assert_allclose(ours, _pil_clean_resize(image), rtol=0, atol=2e-4)


def _feature_sets(dim, n1, n2, seed=0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  a = np.abs(rng.normal(size=(n1, dim)) @ mix)
  b = np.abs(1.2 * rng.normal(size=(n2, dim)) @ mix + 0.1)
  return a, b


def _stats(features):
  return fid.FeatureStats(features.shape[1]).update(features)


@pytest.mark.parametrize("n", [400, 40])  # 40 < dim: singular covariances, pytorch-fid's eps path
def test_fid_matches_pytorch_fid(n):
  a, b = _feature_sets(64, n, n + 7)
  ours = fid.fid_from_stats(_stats(a), _stats(b))
  reference = calculate_frechet_distance(
    a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  )
  assert ours == pytest.approx(reference, rel=1e-3)


def test_frechet_distance_against_eigenvalue_formula():
  a, b = _feature_sets(64, 400, 300, seed=2)
  mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  # Tr (Σ1 Σ2)^½ = Σ √λ(Σ1^½ Σ2 Σ1^½): a symmetric matrix, so eigvalsh, no non-symmetric sqrtm.
  root1 = linalg.sqrtm(s1).real
  trace_root = np.sqrt(np.clip(linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_feature_stats_merge_equals_one_shot(tmp_path):
  features, _ = _feature_sets(32, 1000, 1)
  whole = _stats(features)
  np.testing.assert_allclose(whole.mean, features.mean(0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(whole.covariance, np.cov(features, rowvar=False), rtol=0, atol=1e-12)

  # Chunks of a preempted run and another process, saved and reloaded, then merged.
  first = fid.FeatureStats(32).update(features[:300]).update(features[300:450])
  first.save(str(tmp_path / "part0.npz"))
  second = fid.FeatureStats(32)
  for chunk in np.array_split(features[450:], 7):
    second.update(chunk)
  merged = fid.FeatureStats.load(str(tmp_path / "part0.npz")).merge(second)
  assert merged.count == whole.count == 1000
  np.testing.assert_allclose(merged.mean, whole.mean, rtol=0, atol=1e-12)
  np.testing.assert_allclose(merged.covariance, whole.covariance, rtol=0, atol=1e-12)
  with pytest.raises(ValueError, match="merge 16-d"):
    merged.merge(fid.FeatureStats(16))
  with pytest.raises(ValueError, match=r"expected \(N, 32\) features"):
    merged.update(features[:, :16])

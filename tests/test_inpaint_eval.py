"""Inpainting's figures (`evaluation/inpaint_eval.py`): the kept region's PSNR against OpenCV's,
and the mask around a rendered shape."""

import cv2
import numpy as np
import pytest

from md_jax.data import shapes_scene
from md_jax.evaluation import inpaint_eval


def test_kept_psnr_equals_opencvs_psnr_over_the_kept_pixels():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  generated = np.clip(images + rng.normal(0, 9, images.shape), 0, 255).astype(np.uint8)
  generated[:, :, :8] = 255 - images[:, :, :8]  # the repainted left half: any error, not counted
  masks = np.zeros(images.shape[:3], np.uint8)
  masks[:, :, :8] = 1
  expected = [cv2.PSNR(g[:, 8:], i[:, 8:], 255.0) for g, i in zip(generated, images)]
  np.testing.assert_allclose(inpaint_eval.kept_psnr(generated, images, masks), expected, rtol=1e-9)


@pytest.mark.parametrize("margin", [0, 3])
def test_box_masks_cover_the_rendered_shape_and_its_margin_only(margin):
  scene = shapes_scene.sample_scene(np.random.default_rng(3))
  image = shapes_scene.render(scene, 64, supersample=1)  # hard edges: no faint rim pixels
  mask = inpaint_eval.box_masks(image[None], margin)[0]
  background = np.all(image == image[0, 0], axis=-1)
  ys, xs = np.nonzero(~background)
  assert mask[ys, xs].all()  # every pixel the shapes drew is repainted
  top, left = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
  bottom, right = min(ys.max() + margin, 63), min(xs.max() + margin, 63)
  assert mask.sum() == (bottom - top + 1) * (right - left + 1)

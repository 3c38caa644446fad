"""Edge F1: how well a generated image keeps the edges of the condition it was asked to follow
(issue 42's control metric; the usual score for Canny-conditioned generation).

A generated edge pixel counts as right (precision) when a condition edge lies within `tolerance`
pixels of it (Chebyshev distance: the 3×3 neighbourhood for 1 px), and a condition edge counts as
found (recall) when a generated edge lies that close; F1 is their harmonic mean, per image. The
tolerance forgives the pixel the decoder and Canny's non-maximum suppression may shift an outline
by; without it a perfect copy one pixel off would score 0.
"""

import numpy as np

from md_jax.data import conditions


def _dilate(edges: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of (H, W) by a (2r+1)² square: the pixels within Chebyshev distance r."""
  if radius == 0:
    return edges
  h, w = edges.shape
  padded = np.pad(edges, radius)
  out = np.zeros_like(edges)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[dy : dy + h, dx : dx + w]
  return out


def edge_f1(reference: np.ndarray, predicted: np.ndarray, tolerance: int = 1) -> float:
  """F1 of `predicted` edges (H, W) against `reference` edges (H, W), both boolean or 0/255 (a
  trailing channel of 1 allowed). Both empty: 1 (nothing to draw, nothing drawn); one empty: 0."""
  reference = np.asarray(reference).reshape(np.shape(reference)[:2]) > 0
  predicted = np.asarray(predicted).reshape(np.shape(predicted)[:2]) > 0
  if reference.shape != predicted.shape:
    raise ValueError(f"edge maps differ in size: {reference.shape} vs {predicted.shape}")
  n_ref, n_pred = int(reference.sum()), int(predicted.sum())
  if n_ref == 0 and n_pred == 0:
    return 1.0
  if n_ref == 0 or n_pred == 0:
    return 0.0
  precision = np.sum(predicted & _dilate(reference, tolerance)) / n_pred
  recall = np.sum(reference & _dilate(predicted, tolerance)) / n_ref
  if precision + recall == 0:
    return 0.0
  return float(2 * precision * recall / (precision + recall))


def batch_edge_f1(condition_edges, images, tolerance: int = 1) -> np.ndarray:
  """Per-image F1 (N,) of the Canny edges of uint8 `images` (N, H, W, 3) against
  `condition_edges` (N, H, W[, 1]), the maps the images were generated from."""
  images = np.asarray(images)
  condition_edges = np.asarray(condition_edges)
  if len(images) != len(condition_edges):
    raise ValueError(f"{len(images)} images for {len(condition_edges)} condition maps")
  return np.array(
    [edge_f1(c, conditions.canny(x), tolerance) for c, x in zip(condition_edges, images)]
  )

"""Resizing for refinement, and the per-level statistics of its masks (host side, numpy).

resize_linear computes what jax.image.resize(..., "linear") computes (half-pixel
centres, triangle kernel widened when downscaling: antialiased), as two small
matrix products, so that images of any number of sizes cost no compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np

UNARY_EPS = 1e-5  # keeps -log finite; as pydensecrf's unary_from_softmax clips
FG_LEVELS = ("dataset", "category", "image", "fused", "refined")
IGNORE = 255


def upsample(prob: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of a patch-grid map to (H, W) on device: jax.image.resize "linear".

  The ViT saw the whole image resized to S x S, so the h x w grid spans the
  whole original image; patch centres sit at half-pixel offsets (no corner
  alignment), as jax.image.resize assumes.

  Args:
    prob: [h, w] float.
    size: (H, W).

  Returns:
    [H, W] float32.
  """
  return jax.image.resize(jnp.asarray(prob, jnp.float32), tuple(size), method="linear")


def linear_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] float32 weights of jax.image.resize's "linear" kernel along one axis (antialiased)."""
  inv_scale = np.float32(in_size) / np.float32(out_size)
  kernel_scale = max(inv_scale, np.float32(1.0))
  sample = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * inv_scale - np.float32(0.5)
  distance = np.abs(sample[None, :] - np.arange(in_size, dtype=np.float32)[:, None]) / kernel_scale
  weights = np.maximum(np.float32(0.0), np.float32(1.0) - distance)  # [in, out]
  total = weights.sum(axis=0, keepdims=True)
  weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, weights / np.where(total != 0, total, 1), 0)
  inside = (sample >= -0.5) & (sample <= in_size - 0.5)
  return np.where(inside[None, :], weights, 0).T.astype(np.float32)


def resize_linear(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W, ...] float32 of array [h, w, ...]: jax.image.resize(array, (H, W, ...), "linear") to float rounding."""
  array = np.asarray(array, np.float32)
  rows, cols = linear_weights(array.shape[0], size[0]), linear_weights(array.shape[1], size[1])
  if array.ndim == 2:
    return rows @ array @ np.ascontiguousarray(cols.T)
  out = np.tensordot(rows, array, axes=(1, 0))  # [H, w, ...]
  return np.moveaxis(np.tensordot(cols, out, axes=(1, 1)), 0, 1)


def downscaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
  """(H, W) scaled so that the longer side is at most max_side (unchanged if it already is, or max_side is 0)."""
  height, width = size
  if not max_side or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def downscale_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H', W', 3] uint8: image [H, W, 3] uint8 resized linearly (antialiased), rounded and clipped."""
  if image.shape[:2] == tuple(size):
    return image
  return np.clip(np.round(resize_linear(image, size)), 0, 255).astype(np.uint8)


def nearest_resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W] nearest-neighbour resize of mask [h, w] (pixel centres, no corner alignment)."""
  rows = np.minimum(((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(np.int64), mask.shape[0] - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(np.int64), mask.shape[1] - 1)
  return mask[rows[:, None], cols[None, :]]


def unary_from_prob(fg_prob: jax.Array) -> jax.Array:
  """[..., 2] float32 CRF unary (negative log probability) of (background, foreground) from fg_prob: [...]."""
  p = jnp.clip(jnp.asarray(fg_prob, jnp.float32), UNARY_EPS, 1.0 - UNARY_EPS)
  return -jnp.log(jnp.stack([1.0 - p, p], axis=-1))


def level_stats(level_scores: np.ndarray, fg_prob: np.ndarray, refined: np.ndarray,
                truth: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Foreground pixels of each FG_LEVELS mask and its (intersection, union) with the truth's foreground.

  The level masks are resize_linear(level_scores[l], (H, W)) > 0.5, the fused
  one resize_linear(fg_prob, (H, W)) > 0.5, the refined one is given.

  Args:
    level_scores: [3, h, w] soft scores of the dataset, category and image levels.
    fg_prob: [h, w] fused foreground probability.
    refined: [H, W] bool refined mask.
    truth: [H, W] label map (0 = background, IGNORE = not counted) or None.

  Returns:
    fg_pixels [5] int64; counts [5, 2] int64 (zeros when truth is None).
  """
  size = refined.shape
  grids = [*np.asarray(level_scores, np.float32), np.asarray(fg_prob, np.float32)]
  masks = np.stack([resize_linear(grid, size) > 0.5 for grid in grids] + [np.asarray(refined, bool)])  # [5, H, W]
  fg_pixels = masks.sum(axis=(1, 2), dtype=np.int64)
  if truth is None:
    return fg_pixels, np.zeros((len(FG_LEVELS), 2), np.int64)
  truth = np.asarray(truth)
  if truth.shape != size:
    raise ValueError(f"level_stats: truth must be [H, W] = {size} as the mask, got {truth.shape}")
  counted, truth_fg = truth != IGNORE, (truth != IGNORE) & (truth != 0)
  intersection = (masks & truth_fg).sum(axis=(1, 2), dtype=np.int64)
  union = ((masks | truth_fg) & counted).sum(axis=(1, 2), dtype=np.int64)
  return fg_pixels, np.stack([intersection, union], axis=-1)

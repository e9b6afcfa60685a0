"""Stage 6: foreground regions, their descriptors, and a class per region from k-means over the split.

Regions and boxes are numpy (their number depends on the data, so they are not
jittable); descriptors and the class k-means are JAX. Streaming over a split:

    region_map, n = regions(mask, cfg.min_region_area, cfg.min_region_fraction)  # per image
    fractions = region_patch_fractions(region_map, n, (h, w))
    "pooled": pooled_descriptors(patches, fractions)
    "masked": encode(..., patch_mask=region_patch_masks(fractions)) -> CLS
    "crop":   encode(resize(crop(image, box)) for box in region_boxes(region_map, n)) -> CLS
    ... collect the descriptors of the split, then
    centroids = fit_classes(descriptors, cfg, key=key)
    label_map(region_map, assign_classes(image_descriptors, centroids))  # per image
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from jaxseg.cluster import assign
from jaxseg.framework.config import MethodConfig
from jaxseg.framework.features import METRIC
from jaxseg.framework.features import unit_length
from jaxseg.framework.levels import spherical_kmeans

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def regions(mask: np.ndarray, min_region_area: int = 0, min_region_fraction: float = 0.0) -> tuple[np.ndarray, int]:
  """Splits a foreground mask into labelled regions.

  Args:
    mask: [H, W] bool foreground.
    min_region_area: pixels; with min_region_fraction 0 too, the whole mask is one region.
    min_region_fraction: share of the image's H * W pixels. When either is > 0, regions are the
      8-connected components with at least max(min_region_area, min_region_fraction * H * W)
      pixels; smaller ones become background.

  Returns:
    (region_map [H, W] int32 with 0 = background and 1..R = regions, R).
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2:
    raise ValueError(f"regions: mask must be [H, W], got shape {mask.shape}")
  if min_region_area <= 0 and min_region_fraction <= 0:
    return mask.astype(np.int32), int(mask.any())
  components, count = scipy.ndimage.label(mask, structure=_EIGHT_CONNECTED)
  areas = np.bincount(components.reshape(-1), minlength=count + 1)
  keep = areas >= max(min_region_area, min_region_fraction * mask.size)
  keep[0] = False
  new_id = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
  return new_id[components], int(keep.sum())


def region_patch_fractions(region_map: np.ndarray, num_regions: int, grid: tuple[int, int]) -> np.ndarray:
  """Share of each patch's pixels that lies in each region.

  The h x w patch grid spans the whole image (the ViT saw it resized to S x S).
  Pixel (y, x) falls in patch (floor((y + 0.5) h / H), floor((x + 0.5) w / W));
  an image smaller than the grid is first nearest-neighbour upsampled so that
  every patch gets pixels.

  Args:
    region_map: [H, W] int, 0 = background, 1..R = regions.
    num_regions: R.
    grid: (h, w).

  Returns:
    [R, h, w] float32 in [0, 1].
  """
  region_map = np.asarray(region_map)
  h, w = grid
  height, width = region_map.shape
  rows = _centre_index(max(height, h), height)
  cols = _centre_index(max(width, w), width)
  region_map = region_map[rows[:, None], cols[None, :]]
  patch_rows = _centre_index(region_map.shape[0], h)
  patch_cols = _centre_index(region_map.shape[1], w)
  patch = (patch_rows[:, None] * w + patch_cols[None, :]).reshape(-1)
  per_patch = np.bincount(patch, minlength=h * w)
  in_region = np.bincount(region_map.reshape(-1).astype(np.int64) * (h * w) + patch,
                          minlength=(num_regions + 1) * h * w).reshape(num_regions + 1, h, w)[1:]
  return (in_region / per_patch.reshape(h, w)).astype(np.float32)


def _centre_index(size: int, source_size: int) -> np.ndarray:
  """[size] index into a source axis of source_size for each of size positions, by centre."""
  return np.minimum(((np.arange(size) + 0.5) * source_size / size).astype(np.int64), source_size - 1)


def region_patch_masks(fractions: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """[R, h, w] bool patch masks (e.g. encode's patch_mask for "masked" descriptors).

  A patch belongs to a region if at least `threshold` of its pixels do; a
  region too small for any patch gets its patch of largest share, so no mask
  is empty.

  Args:
    fractions: [R, h, w] from `region_patch_fractions`.
    threshold: share of pixels.
  """
  fractions = np.asarray(fractions)
  masks = fractions >= threshold
  flat = fractions.reshape(fractions.shape[0], -1)
  best = np.zeros_like(masks).reshape(flat.shape)
  best[np.arange(flat.shape[0]), np.argmax(flat, axis=1)] = True
  return masks | best.reshape(masks.shape)


def pooled_descriptors(patches: jax.Array, fractions: jax.Array) -> jax.Array:
  """[R, D] unit "pooled" descriptors: each region's patch features, weighted by its pixel share.

  Args:
    patches: [h, w, D] patch features of the image.
    fractions: [R, h, w] from `region_patch_fractions`.
  """
  weights = jnp.asarray(fractions, jnp.float32)
  pooled = jnp.einsum("rhw,hwd->rd", weights, jnp.asarray(patches, jnp.float32))
  return unit_length(pooled / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1e-12)[:, None])


def region_boxes(region_map: np.ndarray, num_regions: int) -> np.ndarray:
  """[R, 4] int64 bounding boxes (top, left, bottom, right), bottom/right exclusive."""
  boxes = np.zeros((num_regions, 4), np.int64)
  for index, found in enumerate(scipy.ndimage.find_objects(np.asarray(region_map), num_regions)):
    if found is None:
      raise ValueError(f"region_boxes: region {index + 1} of {num_regions} is empty")
    boxes[index] = (found[0].start, found[1].start, found[0].stop, found[1].stop)
  return boxes


def crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
  """image: [H, W, C] cut to box (top, left, bottom, right); resize and normalise it as any ViT input."""
  top, left, bottom, right = (int(v) for v in box)
  return image[top:bottom, left:right]


def fit_classes(descriptors: jax.Array, cfg: MethodConfig, *, key: jax.Array) -> jax.Array:
  """[num_classes, D] unit centroids: spherical k-means of the split's region descriptors.

  Args:
    descriptors: [N, D], one per region of the split.
    cfg: num_classes, sample_budget (more descriptors are subsampled
      uniformly for the fit; all are assigned afterwards), k-means settings.
    key: PRNG key.

  Raises:
    ValueError: fewer regions than classes.
  """
  count = descriptors.shape[0]
  if count < cfg.num_classes:
    raise ValueError(f"fit_classes: {count} regions < num_classes={cfg.num_classes}; lower method.num_classes "
                     "or use more images")
  sample_key, fit_key = jax.random.split(key)
  if count > cfg.sample_budget:
    descriptors = descriptors[jax.random.choice(sample_key, count, (cfg.sample_budget,), replace=False)]
  return spherical_kmeans(descriptors, cfg.num_classes, cfg, key=fit_key)


def assign_classes(descriptors: jax.Array, class_centroids: jax.Array) -> np.ndarray:
  """[R] int32 class (nearest centroid by cosine) of each descriptor [R, D]."""
  if descriptors.shape[0] == 0:
    return np.zeros(0, np.int32)
  return np.asarray(assign(descriptors, class_centroids, METRIC))


def label_map(region_map: np.ndarray, region_classes: np.ndarray) -> np.ndarray:
  """[H, W] uint8 label map: 0 = background, 1 + class inside each region.

  Args:
    region_map: [H, W] int, 0 = background, 1..R.
    region_classes: [R] int class of each region, in [0, 254).
  """
  region_classes = np.asarray(region_classes, np.int64)
  if region_classes.size and (region_classes.min() < 0 or region_classes.max() >= 254):
    raise ValueError(f"label_map: classes must be in [0, 254), got [{region_classes.min()}, {region_classes.max()}]")
  lookup = np.concatenate([[0], region_classes + 1]).astype(np.uint8)
  return lookup[np.asarray(region_map)]

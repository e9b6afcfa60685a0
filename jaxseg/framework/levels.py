"""Stages 1-3: foreground/background clustering at the dataset, category and image levels.

Every level ends in a pair of unit prototypes [2, D], index 0 = background,
1 = foreground (the dataset level also keeps its k centroids), and scores a
patch by its cosine margin: cos(patch, fg) - cos(patch, bg), > 0 = foreground.

Streaming over a split (the runner), with PatchFeatures batches `f`:

    # stage 1: dataset level
    sample = reservoir_init(cfg.sample_budget, D)
    for f: sample = sample_patches(sample, f, key=..., first=...)   # first: f's position in the split
    centroids = fit_dataset_centroids(sample, cfg, key=...)
    stats = None
    for f: stats = accumulate_stats(stats, dataset_cluster_stats(f, centroids))
    dataset = dataset_level(centroids, stats, cfg.fg_prior)
    # stage 2: category level (needs the CLS tokens of every image)
    category_centroids = fit_categories(all_cls, cfg, key=...)
    samples = category_sample_init(cfg, D)
    for f: samples = sample_category_patches(samples, f, assign_categories(f, category_centroids), key=..., first=...)
    category_prototypes = fit_category_prototypes(samples, dataset, cfg)
    # stage 3 and the margins of all levels
    for f: margins = level_margins(f, dataset, category_centroids, category_prototypes, cfg)
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.cluster import assign
from jaxseg.cluster import distances
from jaxseg.cluster import kmeans
from jaxseg.cluster.stream import ReservoirState
from jaxseg.cluster.stream import reservoir_add
from jaxseg.cluster.stream import reservoir_init
from jaxseg.cluster.stream import reservoir_sorted
from jaxseg.framework.config import MethodConfig
from jaxseg.framework.features import METRIC
from jaxseg.framework.features import PatchFeatures
from jaxseg.framework.features import border_patches
from jaxseg.framework.features import unit_length



class ClusterStats(NamedTuple):
  """Per dataset cluster sums that decide the foreground prior after a streaming pass.

  Attributes:
    count: [k] valid patches assigned to each cluster.
    border_count: [k] of those, patches on the image border.
    attention_sum: [k] sum of their CLS attention.
  """
  count: jax.Array
  border_count: jax.Array
  attention_sum: jax.Array


class DatasetLevel(NamedTuple):
  """Result of stage 1.

  Attributes:
    centroids: [k, D] unit centroids of the dataset-level k-means.
    foreground: [k] bool, which clusters are foreground.
    prototypes: [2, D] unit (background, foreground) centroids: count-weighted
      means of the background / foreground clusters, renormalised. A side whose
      clusters are all empty (a degenerate k-means: every patch of the split
      went to the other side) takes the plain mean of its clusters' centroids,
      so no prototype is zero and the 2-means below start from real directions.
  """
  centroids: jax.Array
  foreground: jax.Array
  prototypes: jax.Array


class LevelMargins(NamedTuple):
  """Per-batch result of `level_margins`.

  Attributes:
    margins: [3, B, h, w] float32 cosine margins of the dataset, category and
      image levels; 0 where not valid.
    categories: [B] int32 category of each image, -1 for padded images.
    image_prototypes: [B, 2, D] the (bg, fg) 2-means centroids of each image.
  """
  margins: jax.Array
  categories: jax.Array
  image_prototypes: jax.Array


def _cosine(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """[..., k] cosine of every x: [..., D] with every centroid: [k, D]."""
  flat = x.reshape(-1, x.shape[-1])
  return (1.0 - distances(flat, centroids, METRIC)).reshape(*x.shape[:-1], centroids.shape[0])


def _flat(features: PatchFeatures) -> tuple[jax.Array, jax.Array]:
  """([B*h*w, D] patches, [B*h*w] valid)."""
  return features.patches.reshape(-1, features.patches.shape[-1]), features.valid.reshape(-1)


def _image_valid(features: PatchFeatures) -> jax.Array:
  """[B] bool: the image has at least one valid patch."""
  return jnp.any(features.valid, axis=(1, 2))


def orient(centroids: jax.Array, parent_fg: jax.Array) -> jax.Array:
  """Orders 2-means centroids [2, D] as (bg, fg): fg = the one nearest parent_fg [D] by cosine."""
  swap = jnp.argmax(_cosine(parent_fg, centroids)) == 0
  return jnp.where(swap, centroids[::-1], centroids)


def pair_margins(patches: jax.Array, prototypes: jax.Array) -> jax.Array:
  """Cosine margin of every patch to its image's (bg, fg) prototypes.

  Args:
    patches: [B, h, w, D] unit features.
    prototypes: [B, 2, D] (bg, fg) per image.

  Returns:
    [B, h, w] cos(patch, fg) - cos(patch, bg).
  """
  cos = jax.vmap(_cosine)(patches, prototypes)
  return cos[..., 1] - cos[..., 0]


def spherical_kmeans(x: jax.Array, k: int, cfg: MethodConfig, *, key: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
  """[k, D] unit centroids of x: [N, D] (mask: [N] bool) with the config's k-means++ settings."""
  return kmeans(x, k, key=key, mask=mask, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_max_iter,
                tol=cfg.kmeans_tol, metric=METRIC).centroids


def split_from_parent(x: jax.Array, mask: jax.Array, parent: jax.Array, cfg: MethodConfig) -> jax.Array:
  """[2, D] (bg, fg) of a 2-means of x: [N, D] (mask: [N] bool) started from parent: [2, D] (bg, fg).

  fg = the centroid nearest the parent fg. Degenerate splits fall back to the parent: with no
  valid point both prototypes are the parent's; a cluster that stays empty (every point on
  the other centroid) keeps the parent's centroid it started from; a centroid that vanishes
  (unit points summing to zero) is replaced by the parent's prototype of the same role.
  """
  result = kmeans(x, 2, key=jax.random.key(0), mask=mask, max_iter=cfg.kmeans_max_iter, tol=cfg.kmeans_tol,
                  metric=METRIC, init=parent)  # the key is unused when init is given
  oriented = orient(result.centroids, parent[1])
  vanished = jnp.linalg.norm(oriented, axis=-1, keepdims=True) < 0.5  # unit rows or zero
  return jnp.where(vanished, parent, oriented)


# ---- stage 1: dataset level ----------------------------------------------------------------------

def patch_ids(features: PatchFeatures, first: jax.Array) -> jax.Array:
  """[B*h*w] uint32 id of every patch of a batch whose images sit at positions first, first+1, ... of the
  split: position * h*w + patch, so a patch's sampling priority depends on its image, not on its batch."""
  batch, h, w, _ = features.patches.shape
  positions = jnp.asarray(first, jnp.uint32) + jnp.arange(batch, dtype=jnp.uint32)
  return (positions[:, None] * jnp.uint32(h * w) + jnp.arange(h * w, dtype=jnp.uint32)).reshape(-1)


def sample_patches(sample: ReservoirState, features: PatchFeatures, *, key: jax.Array,
                   first: jax.Array) -> ReservoirState:
  """Adds a batch's valid patches to a uniform reservoir sample (jaxseg.cluster.stream).

  key: the same for every batch; first: the split position of the batch's first image (see patch_ids).
  """
  x, valid = _flat(features)
  return reservoir_add(sample, x, key=key, mask=valid, ids=patch_ids(features, first))


def fit_dataset_centroids(sample: ReservoirState, cfg: MethodConfig, *, key: jax.Array) -> jax.Array:
  """[dataset_k, D] unit centroids: spherical k-means of the sampled patches, in priority order."""
  sample = reservoir_sorted(sample)
  return spherical_kmeans(sample.points, cfg.dataset_k, cfg, key=key, mask=sample.mask)


@jax.jit
def dataset_cluster_stats(features: PatchFeatures, centroids: jax.Array) -> ClusterStats:
  """Sums of one batch per dataset cluster; add batches with `accumulate_stats`.

  Args:
    features: a batch.
    centroids: [k, D] dataset centroids.

  Returns:
    ClusterStats of [k] arrays (int32 counts: one batch cannot overflow them).
  """
  x, valid = _flat(features)
  labels = assign(x, centroids, METRIC, mask=valid)
  onehot = labels[:, None] == jnp.arange(centroids.shape[0])
  border = border_patches(features.valid).reshape(-1)
  return ClusterStats(
      count=jnp.sum(onehot, axis=0, dtype=jnp.int32),
      border_count=jnp.sum(onehot & border[:, None], axis=0, dtype=jnp.int32),
      attention_sum=jnp.sum(onehot * features.attention.reshape(-1, 1), axis=0))


def accumulate_stats(total: ClusterStats | None, stats: ClusterStats) -> ClusterStats:
  """total + stats in numpy float64 (exact for counts up to 2**53); total=None starts a sum."""
  stats = ClusterStats(*(np.asarray(s, np.float64) for s in stats))
  if total is None:
    return stats
  return ClusterStats(*(np.asarray(t, np.float64) + s for t, s in zip(total, stats)))


def foreground_clusters(stats: ClusterStats, fg_prior: str) -> np.ndarray:
  """Decides which dataset clusters are foreground.

  "border": a cluster is foreground if its share of border patches is below
  the share over all patches (objects sit away from the border). "attention":
  if its mean CLS attention is above the mean over all patches. Empty clusters
  are background; if no cluster qualifies (all alike), the most
  foreground-like non-empty one is foreground.

  Args:
    stats: summed over the split.
    fg_prior: "border" or "attention".

  Returns:
    [k] bool.
  """
  count = np.asarray(stats.count, np.float64)
  if fg_prior == "border":
    value = np.asarray(stats.border_count, np.float64)
    sign = -1.0  # less border = more foreground
  elif fg_prior == "attention":
    value = np.asarray(stats.attention_sum, np.float64)
    sign = 1.0
  else:
    raise ValueError(f"foreground_clusters: fg_prior={fg_prior!r}, expected 'border' or 'attention'")
  if count.sum() == 0:
    raise ValueError("foreground_clusters: no patch was assigned to any cluster (empty split?)")
  nonempty = count > 0
  per_cluster = np.divide(value, count, out=np.zeros_like(value), where=nonempty)
  fg_score = sign * (per_cluster - value.sum() / count.sum())
  foreground = nonempty & (fg_score > 0)
  if not foreground.any():
    foreground[np.argmax(np.where(nonempty, fg_score, -np.inf))] = True
  return foreground


def _side_prototype(centroids: jax.Array, count: np.ndarray, side: np.ndarray) -> jax.Array:
  """[D] unit count-weighted mean of the side's centroids [k, D] (side: [k] bool, count: [k]).

  All of the side's clusters empty: their plain mean (DatasetLevel.prototypes).
  """
  weights = count * side if np.sum(count * side) > 0 else side.astype(np.float64)
  return unit_length(jnp.asarray(weights, jnp.float32) @ centroids)


def dataset_level(centroids: jax.Array, stats: ClusterStats, fg_prior: str) -> DatasetLevel:
  """Stage 1 result from the fitted centroids [k, D] and the split's summed ClusterStats."""
  centroids = unit_length(centroids)
  foreground = foreground_clusters(stats, fg_prior)
  count = np.asarray(stats.count, np.float64)
  prototypes = jnp.stack([_side_prototype(centroids, count, ~foreground),
                          _side_prototype(centroids, count, foreground)])
  return DatasetLevel(centroids, jnp.asarray(foreground), prototypes)


def dataset_margins(patches: jax.Array, level: DatasetLevel) -> jax.Array:
  """[...] margin of patches [..., D]: max cos to a fg cluster - max cos to a bg cluster.

  Positive exactly where the nearest dataset centroid is foreground; for
  dataset_k = 2 it equals the margin to the two prototypes.
  """
  cos = _cosine(patches, level.centroids)
  fg = jnp.max(jnp.where(level.foreground, cos, -jnp.inf), axis=-1)
  bg = jnp.max(jnp.where(level.foreground, -jnp.inf, cos), axis=-1)
  return fg - bg


# ---- stage 2: category level ---------------------------------------------------------------------

def fit_categories(cls: jax.Array, cfg: MethodConfig, *, key: jax.Array) -> jax.Array:
  """[num_categories, D] unit centroids: spherical k-means of the CLS tokens cls: [N, D] of the split.

  Raises:
    ValueError: fewer images than categories.
  """
  if cls.shape[0] < cfg.num_categories:
    raise ValueError(f"fit_categories: {cls.shape[0]} images < num_categories={cfg.num_categories}; "
                     "lower method.num_categories")
  return spherical_kmeans(cls, cfg.num_categories, cfg, key=key)


@jax.jit
def assign_categories(features: PatchFeatures, category_centroids: jax.Array) -> jax.Array:
  """[B] int32 category (nearest centroid of the CLS token) of each image; -1 for padded images."""
  return assign(features.cls, category_centroids, METRIC, mask=_image_valid(features))


def category_sample_init(cfg: MethodConfig, dim: int) -> ReservoirState:
  """One empty reservoir per category, stacked: [num_categories, sample_budget // num_categories, ...]."""
  empty = reservoir_init(cfg.sample_budget // cfg.num_categories, dim)
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_categories, *a.shape)), empty)


@jax.jit
def sample_category_patches(samples: ReservoirState, features: PatchFeatures, categories: jax.Array, *,
                            key: jax.Array, first: jax.Array) -> ReservoirState:
  """Adds each image's valid patches to the reservoir of its category.

  Args:
    samples: stacked reservoirs from `category_sample_init`.
    features: a batch.
    categories: [B] int32 from `assign_categories`.
    key: PRNG key, the same for every batch.
    first: the split position of the batch's first image (see patch_ids).
  """
  x, valid = _flat(features)
  ids = patch_ids(features, first)
  patch_category = jnp.repeat(categories, valid.shape[0] // categories.shape[0])
  num_categories = samples.points.shape[0]
  masks = valid & (patch_category == jnp.arange(num_categories)[:, None])  # [C, B*h*w]
  return jax.vmap(lambda s, m: reservoir_add(s, x, key=key, mask=m, ids=ids))(samples, masks)


@functools.partial(jax.jit, static_argnames=("cfg",))
def fit_category_prototypes(samples: ReservoirState, dataset: DatasetLevel, cfg: MethodConfig) -> jax.Array:
  """[num_categories, 2, D] (bg, fg) prototypes: 2-means of each category's sampled patches.

  Each 2-means starts from the dataset prototypes; fg = the centroid nearest
  the dataset fg prototype. A category with no sampled patch keeps the dataset
  prototypes. Each sample is fitted in priority order (reservoir_sorted), which does not depend on the batching.
  """
  samples = jax.vmap(reservoir_sorted)(samples)
  return jax.vmap(lambda points, mask: split_from_parent(points, mask, dataset.prototypes, cfg))(
      samples.points, samples.mask)


# ---- stage 3: image level, and the margins of all levels -----------------------------------------

def image_prototypes(features: PatchFeatures, parents: jax.Array, cfg: MethodConfig) -> jax.Array:
  """[B, 2, D] (bg, fg) prototypes: 2-means over each image's valid patches.

  Args:
    features: a batch.
    parents: [B, 2, D] (bg, fg) category prototypes of each image: the 2-means
      starts from them and fg = the centroid nearest the parent fg.
    cfg: for kmeans_max_iter and kmeans_tol.
  """
  _, h, w, dim = features.patches.shape
  return jax.vmap(lambda patches, valid, parent: split_from_parent(
      patches.reshape(h * w, dim), valid.reshape(h * w), parent, cfg))(features.patches, features.valid, parents)


@functools.partial(jax.jit, static_argnames=("cfg",))
def level_margins(features: PatchFeatures, dataset: DatasetLevel, category_centroids: jax.Array,
                  category_prototypes: jax.Array, cfg: MethodConfig) -> LevelMargins:
  """Stages 1-3 on one batch: the cosine margin of every patch at every level.

  Args:
    features: a batch (fixed shape; padded images all invalid).
    dataset: stage 1 result.
    category_centroids: [C, D] from `fit_categories`.
    category_prototypes: [C, 2, D] from `fit_category_prototypes`.
    cfg: static config.

  Returns:
    LevelMargins (margins [3, B, h, w], categories [B], image_prototypes [B, 2, D]).
  """
  categories = assign_categories(features, category_centroids)
  parents = category_prototypes[jnp.maximum(categories, 0)]
  images = image_prototypes(features, parents, cfg)
  margins = jnp.stack([dataset_margins(features.patches, dataset),
                       pair_margins(features.patches, parents),
                       pair_margins(features.patches, images)])
  return LevelMargins(jnp.where(features.valid, margins, 0.0), categories, images)

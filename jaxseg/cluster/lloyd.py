"""k-means as scikit-learn computes it (greedy k-means++, Lloyd, best of n_init), masked and vmappable.

Conventions shared by every function here:
  - metric "euclidean": distance = squared Euclidean distance, inertia = sum of it.
  - metric "cosine": spherical k-means. Points and centroids are scaled to unit
    length (an all-zero row stays zero), distance = 1 - cos, inertia = sum of it.
  - mask [N] bool: False marks padding. Masked rows are excluded from
    initialisation, updates, tolerance and inertia, may hold any values (even
    NaN), and are labelled -1.

Degenerate inputs give finite results:
  - fully masked input: labels all -1, inertia 0, centroids = init if given,
    else zeros.
  - fewer distinct valid points than k (all-identical points, N < k): every
    distinct point is a centroid and some centroids coincide (up to float
    rounding); a point takes one of its coinciding centroids (the lowest index
    when they are bitwise equal) and the others stay empty. Inertia is 0.
  - a cluster that empties during Lloyd's iterations is re-seeded, as in
    scikit-learn, from the valid point farthest from its own centroid (the j-th
    empty cluster gets the j-th farthest point, which leaves its old cluster;
    scikit-learn takes the same points, with several empty clusters maybe in
    another order).
    Empty clusters keep their previous centroid when there is no such point:
    fewer valid points than empty clusters, or every point on its centroid
    (within 1e-6 of the mean squared norm; scikit-learn would zero them).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

METRICS = ("euclidean", "cosine")

# Full float32 matmuls: accelerators would otherwise round distances to bf16/tf32.
_PRECISION = jax.lax.Precision.HIGHEST
_EPS = 1e-12
# Points nearer their centroid than this fraction of the mean squared norm count as on it.
_ON_CENTROID = 1e-6
# Batched restarts hold [n_init, N, k] float32 scores; beyond this many, restarts run one by one.
_MAX_BATCHED_SCORES = 1 << 26


class KMeansResult(NamedTuple):
  """Result of `kmeans`.

  Attributes:
    centroids: [k, D] float32 cluster centres (unit length for metric "cosine").
    labels: [N] int32 index of each point's nearest centroid, -1 where masked.
    inertia: [] float32 sum over valid points of the distance to their centroid.
  """
  centroids: jax.Array
  labels: jax.Array
  inertia: jax.Array


def _check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")


def _unit_rows(v: jax.Array) -> jax.Array:
  """Scales each row of v: [..., D] to unit length; all-zero rows stay zero."""
  norm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
  return v / jnp.maximum(norm, _EPS)


def _prepare(x: jax.Array, metric: str) -> jax.Array:
  """float32 copy of x: [..., D], unit rows for the cosine metric."""
  x = jnp.asarray(x, jnp.float32)
  return _unit_rows(x) if metric == "cosine" else x


def _scores(x: jax.Array, centroids: jax.Array, metric: str) -> jax.Array:
  """[N, k] distance minus a per-point constant, so argmin gives the nearest centroid.

  One [N, D] x [D, k] matmul: ||c||^2 - 2 x.c (euclidean) or -x.c (cosine, unit x and c).
  """
  dots = jnp.matmul(x, centroids.T, precision=_PRECISION)
  if metric == "cosine":
    return -dots
  return jnp.sum(centroids * centroids, axis=-1) - 2.0 * dots


def _scores_to_distance(scores: jax.Array, x_sq: jax.Array, metric: str) -> jax.Array:
  """Adds back the per-point constant of `_scores`; x_sq: [N] squared norms of x."""
  offset = 1.0 if metric == "cosine" else x_sq[..., None]
  return jnp.maximum(scores + offset, 0.0)


def distances(x: jax.Array, centroids: jax.Array, metric: str = "euclidean") -> jax.Array:
  """Distance of every point to every centroid.

  Args:
    x: [N, D] points.
    centroids: [k, D] centroids.
    metric: "euclidean" (squared distance) or "cosine" (1 - cos).

  Returns:
    [N, k] float32 distances, >= 0.
  """
  _check_metric(metric)
  x, centroids = _prepare(x, metric), _prepare(centroids, metric)
  return _scores_to_distance(_scores(x, centroids, metric), jnp.sum(x * x, axis=-1), metric)


def assign_with_distance(x: jax.Array, centroids: jax.Array, metric: str = "euclidean", *,
                         mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of every point and the distance to it.

  Args:
    x: [N, D] points.
    centroids: [k, D] centroids.
    metric: "euclidean" or "cosine".
    mask: [N] bool, False = padding.

  Returns:
    labels: [N] int32, -1 where masked; distance: [N] float32, 0 where masked.
  """
  _check_metric(metric)
  x, centroids = _prepare(x, metric), _prepare(centroids, metric)
  scores = _scores(x, centroids, metric)
  labels = jnp.argmin(scores, axis=-1).astype(jnp.int32)
  nearest = jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]
  distance = _scores_to_distance(nearest[:, None], jnp.sum(x * x, axis=-1), metric)[:, 0]
  if mask is not None:
    labels = jnp.where(mask, labels, -1)
    distance = jnp.where(mask, distance, 0.0)
  return labels, distance


def assign(x: jax.Array, centroids: jax.Array, metric: str = "euclidean", *,
           mask: jax.Array | None = None) -> jax.Array:
  """[N] int32 index of the nearest centroid of each point x: [N, D], -1 where masked."""
  return assign_with_distance(x, centroids, metric, mask=mask)[0]


def _sample_index(key: jax.Array, weights: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Indices drawn with probability proportional to weights: [N] >= 0 (index 0 if all are 0).

  Inverse-CDF sampling like scikit-learn's; side="right" never picks a zero-weight index.
  """
  cdf = jnp.cumsum(weights)
  u = jax.random.uniform(key, shape) * cdf[-1]
  return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), weights.shape[0] - 1)


def _kmeans_plusplus(x: jax.Array, x_sq: jax.Array, weights: jax.Array, k: int,
                     key: jax.Array) -> jax.Array:
  """Greedy k-means++ (scikit-learn's): [k, D] initial centroids drawn from the weighted points.

  Args:
    x: [N, D] points; x_sq: [N] their squared norms; weights: [N] 1 for valid, 0 for padding.
    k: number of centroids.
    key: PRNG key.
  """
  n_trials = 2 + int(math.log(k))
  first_key, trials_key = jax.random.split(key)

  def squared_distances(points):  # [T, D] -> [T, N]
    dots = jnp.matmul(points, x.T, precision=_PRECISION)
    return jnp.maximum(x_sq - 2.0 * dots + jnp.sum(points * points, axis=-1)[:, None], 0.0)

  first = _sample_index(first_key, weights, ())
  centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
  closest = squared_distances(x[first][None])[0]
  potential = jnp.dot(closest, weights, precision=_PRECISION)

  def add_centroid(c, carry):
    centroids, closest, potential = carry
    # Once every point sits on a centroid (duplicates), draw uniformly among the valid ones.
    trial_weights = jnp.where(potential > 0, weights * closest, weights)
    candidates = _sample_index(jax.random.fold_in(trials_key, c), trial_weights, (n_trials,))
    closest_if = jnp.minimum(closest, squared_distances(x[candidates]))  # [T, N]
    potentials = jnp.dot(closest_if, weights, precision=_PRECISION)
    best = jnp.argmin(potentials)
    return centroids.at[c].set(x[candidates[best]]), closest_if[best], potentials[best]

  centroids, _, _ = jax.lax.fori_loop(1, k, add_centroid, (centroids, closest, potential))
  return centroids


def _update_centroids(x: jax.Array, x_sq: jax.Array, weights: jax.Array, labels: jax.Array,
                      nearest: jax.Array, centroids: jax.Array, metric: str) -> jax.Array:
  """One Lloyd M-step with scikit-learn's empty-cluster relocation.

  Args:
    x: [N, D] points; x_sq: [N] squared norms; weights: [N] 1 valid / 0 padding.
    labels: [N] nearest centroid of each point; nearest: [N] its `_scores` value.
    centroids: [k, D] current centroids, kept for clusters that stay empty.
    metric: "euclidean" or "cosine".

  Returns:
    [k, D] new centroids.
  """
  k = centroids.shape[0]
  onehot = (labels[:, None] == jnp.arange(k)).astype(x.dtype) * weights[:, None]
  counts = jnp.sum(onehot, axis=0)
  # A one-hot matmul rather than segment_sum: scatters are slow batched (vmap) and on accelerators.
  sums = jnp.matmul(onehot.T, x, precision=_PRECISION)

  # Distance of each valid point to its own centroid; -1 marks padding.
  distance = jnp.where(weights > 0, _scores_to_distance(nearest[:, None], x_sq, metric)[:, 0], -1.0)

  def relocate(sums_counts):
    sums, counts = sums_counts
    empty = counts == 0
    n_far = min(k, x.shape[0])
    far_distance, far = jax.lax.top_k(distance, n_far)
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, n_far - 1)
    source = far[rank]  # [k] the point each empty cluster takes
    moved = empty & (jnp.cumsum(empty) <= n_far) & (far_distance[rank] >= 0)
    moved_x = jnp.where(moved[:, None], x[source], 0.0)
    moved_w = moved.astype(x.dtype)
    # The point leaves its old cluster and becomes the sole member of the empty one.
    sums = sums.at[labels[source]].add(-moved_x) + moved_x
    counts = counts.at[labels[source]].add(-moved_w) + moved_w
    return sums, counts

  # As scikit-learn: nothing to gain when every point sits on its centroid (duplicates), up to rounding.
  on_centroid = _ON_CENTROID * jnp.sum(weights * x_sq) / jnp.maximum(jnp.sum(weights), 1.0)
  needs_relocation = jnp.any(counts == 0) & (jnp.max(distance) > on_centroid)
  sums, counts = jax.lax.cond(needs_relocation, relocate, lambda sc: sc, (sums, counts))
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  if metric == "cosine":
    means = _unit_rows(means)
  return jnp.where((counts > 0)[:, None], means, centroids)


def _lloyd(x: jax.Array, x_sq: jax.Array, weights: jax.Array, centroids: jax.Array,
           tol: jax.Array, max_iter: int, metric: str) -> KMeansResult:
  """Lloyd's iterations from centroids: [k, D] until labels repeat, the squared shift <= tol, or max_iter.

  Returns centroids, labels (computed from the final centroids, not yet -1 where masked)
  and inertia, as scikit-learn's _kmeans_single_lloyd.
  """
  valid = weights > 0

  def e_step(centroids):
    scores = _scores(x, centroids, metric)
    labels = jnp.argmin(scores, axis=-1).astype(jnp.int32)
    return labels, jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]

  def not_done(state):
    iteration, _, _, converged = state
    return (iteration < max_iter) & ~converged

  def step(state):
    iteration, centroids, previous_labels, _ = state
    labels, nearest = e_step(centroids)
    new_centroids = _update_centroids(x, x_sq, weights, labels, nearest, centroids, metric)
    shift = jnp.sum((new_centroids - centroids) ** 2)
    same_labels = jnp.all((labels == previous_labels) | ~valid)
    return iteration + 1, new_centroids, labels, same_labels | (shift <= tol)

  no_labels = jnp.full(x.shape[0], -1, jnp.int32)
  _, centroids, _, _ = jax.lax.while_loop(not_done, step, (0, centroids, no_labels, False))
  labels, nearest = e_step(centroids)
  inertia = jnp.sum(weights * _scores_to_distance(nearest[:, None], x_sq, metric)[:, 0])
  return KMeansResult(centroids, labels, inertia)


@functools.partial(jax.jit, static_argnames=("k", "n_init", "max_iter", "metric"))
def kmeans(x: jax.Array, k: int, *, key: jax.Array, mask: jax.Array | None = None, n_init: int = 10,
           max_iter: int = 100, tol: float = 1e-4, metric: str = "euclidean",
           init: jax.Array | None = None) -> KMeansResult:
  """k-means as scikit-learn's KMeans(n_clusters=k, n_init, max_iter, tol) computes it.

  Greedy k-means++ initialisation, Lloyd's iterations until the labels repeat or
  the squared centroid shift is <= tol * (mean per-feature variance of the valid
  points), best of n_init restarts by inertia. Euclidean runs on mean-centred
  points, as scikit-learn does, for float32 accuracy. Jitted; k, n_init,
  max_iter and metric are static. Per-image clustering is
  `jax.vmap(functools.partial(kmeans, k=2))(x, key=keys, mask=masks)`.
  Restarts run batched (one pass over x serves all of them) while their
  [n_init, N, k] float32 scores stay under 256 MB, else one after another.
  See the module docstring for degenerate inputs.

  Args:
    x: [N, D] points.
    k: number of clusters.
    key: PRNG key for k-means++.
    mask: [N] bool, False = padding (excluded, labelled -1). None = all valid.
    n_init: restarts; ignored when init is given.
    max_iter: maximum Lloyd iterations per restart.
    tol: relative tolerance on the squared centroid shift (scikit-learn's meaning).
    metric: "euclidean" or "cosine" (spherical k-means, inertia = sum of 1 - cos).
    init: [k, D] initial centroids; one run from them instead of k-means++.

  Returns:
    KMeansResult(centroids [k, D], labels [N] int32, inertia [] float32).
  """
  _check_metric(metric)
  if x.ndim != 2:
    raise ValueError(f"kmeans: x must be [N, D], got shape {x.shape}.")
  if k < 1 or n_init < 1 or max_iter < 1:
    raise ValueError(f"kmeans: k, n_init and max_iter must be >= 1, got {k}, {n_init}, {max_iter}.")
  if mask is not None and mask.shape != x.shape[:1]:
    raise ValueError(f"kmeans: mask must be [N] = {x.shape[:1]}, got shape {mask.shape}.")
  if init is not None and init.shape != (k, x.shape[1]):
    raise ValueError(f"kmeans: init must be [k, D] = {(k, x.shape[1])}, got shape {init.shape}.")

  valid = jnp.ones(x.shape[0], bool) if mask is None else mask.astype(bool)
  weights = valid.astype(jnp.float32)
  n_valid = jnp.sum(weights)
  x = jnp.where(valid[:, None], _prepare(x, metric), 0.0)
  mean = jnp.dot(weights, x, precision=_PRECISION) / jnp.maximum(n_valid, 1.0)
  variance = jnp.mean(jnp.dot(weights, (x - mean) ** 2, precision=_PRECISION)) / jnp.maximum(n_valid, 1.0)
  tol_abs = tol * variance
  # Centring changes no distance, only float32 cancellation; spherical k-means needs the origin.
  shift = mean if metric == "euclidean" else jnp.zeros_like(mean)
  x = jnp.where(valid[:, None], x - shift, 0.0)
  x_sq = jnp.sum(x * x, axis=-1)

  if init is not None:
    result = _lloyd(x, x_sq, weights, _prepare(init, metric) - shift, tol_abs, max_iter, metric)
  else:
    # Restarts run batched, so that each pass over x serves all of them, unless their scores get too big.
    inits = jax.vmap(lambda run_key: _kmeans_plusplus(x, x_sq, weights, k, run_key))(
        jax.random.split(key, n_init))
    lloyd = lambda centroids: _lloyd(x, x_sq, weights, centroids, tol_abs, max_iter, metric)
    batched = n_init * x.shape[0] * k <= _MAX_BATCHED_SCORES
    runs = jax.vmap(lloyd)(inits) if batched else jax.lax.map(lloyd, inits)
    best = jnp.argmin(runs.inertia)
    result = jax.tree.map(lambda r: r[best], runs)

  fallback = jnp.zeros((k, x.shape[1]), jnp.float32) if init is None else jnp.asarray(init, jnp.float32)
  centroids = jnp.where(n_valid > 0, result.centroids + shift, fallback)
  labels = jnp.where(valid, result.labels, -1)
  return KMeansResult(centroids, labels, result.inertia)

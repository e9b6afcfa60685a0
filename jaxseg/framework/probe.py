"""How well a patch feature separates foreground from background: a linear probe and per-image 2-means.

Both score binary patch masks against patch labels (`patch_labels`) with
`binary_counts`, whose (tp, fp, fn, tn) sums over a split give the accuracy
and the foreground IoU (`count_scores`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.cluster import kmeans
from jaxseg.framework.config import FG_PRIORS
from jaxseg.framework.labeling import region_patch_fractions

_EPS = 1e-6


class Probe(NamedTuple):
  """A logistic regression on standardised features: logit = ((x - mean) / scale) . weights + bias.

  Attributes:
    mean: [D] mean of the training features.
    scale: [D] their standard deviation (at least 1e-6).
    weights: [D].
    bias: [].
  """
  mean: jax.Array
  scale: jax.Array
  weights: jax.Array
  bias: jax.Array


def probe_logits(probe: Probe, x: jax.Array) -> jax.Array:
  """[...] foreground logits (> 0 = foreground) of features x: [..., D]."""
  return ((jnp.asarray(x, jnp.float32) - probe.mean) / probe.scale) @ probe.weights + probe.bias


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "l2", "batch_size"))
def fit_probe(x: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *, key: jax.Array,
              steps: int = 300, learning_rate: float = 0.05, l2: float = 1e-4,
              batch_size: int | None = None) -> Probe:
  """Logistic regression (mean binary cross-entropy + l2 * |w|^2) fitted with Adam.

  Features are standardised with the training mean and standard deviation, so
  one learning rate suits any feature scale (e.g. CLS attention, D = 1).

  Args:
    x: [N, D] features.
    labels: [N] bool or {0, 1}, True = foreground.
    mask: [N] bool, False = not a training point (padding, unlabelled). None = all.
    key: PRNG key drawing the minibatches (unused when batch_size is None).
    steps: Adam steps.
    learning_rate: Adam step size.
    l2: weight decay on the weights (not the bias).
    batch_size: points per step, drawn uniformly with replacement among the
      valid ones; None = every point at every step.

  Returns:
    Probe. With no valid point: mean 0, scale 1, weights 0, bias 0.
  """
  x = jnp.asarray(x, jnp.float32)
  num, dim = x.shape
  mask = jnp.ones(num, bool) if mask is None else jnp.asarray(mask, bool)
  weight = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  mean = jnp.sum(weight[:, None] * x, axis=0) / count
  scale = jnp.maximum(jnp.sqrt(jnp.sum(weight[:, None] * jnp.square(x - mean), axis=0) / count), _EPS)
  standard = jnp.where(mask[:, None], (x - mean) / scale, 0.0)
  target = jnp.asarray(labels, jnp.float32)

  def loss(params, points, y, w):
    logits = points @ params[0] + params[1]
    return jnp.sum(w * optax.sigmoid_binary_cross_entropy(logits, y)) / jnp.maximum(jnp.sum(w), 1.0) \
        + l2 * jnp.sum(jnp.square(params[0]))

  optimizer = optax.adam(learning_rate)
  params = (jnp.zeros(dim, jnp.float32), jnp.zeros((), jnp.float32))

  def step(carry, step_key):
    params, state = carry
    if batch_size is None:
      points, y, w = standard, target, weight
    else:
      # Sampling by weight keeps every minibatch full of valid points.
      index = jax.random.categorical(step_key, jnp.where(mask, 0.0, -jnp.inf), shape=(batch_size,))
      points, y, w = standard[index], target[index], weight[index]
    grads = jax.grad(loss)(params, points, y, w)
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
  return Probe(mean, scale, *params)


@functools.partial(jax.jit, static_argnames=("metric", "n_init", "max_iter", "tol"))
def image_two_means(x: jax.Array, valid: jax.Array, *, key: jax.Array, metric: str = "cosine", n_init: int = 10,
                    max_iter: int = 100, tol: float = 1e-4) -> jax.Array:
  """2-means inside each image (k-means++ with n_init restarts, as jaxseg.cluster.kmeans).

  Args:
    x: [B, P, D] patch features.
    valid: [B, P] bool; invalid patches are not clustered.
    key: PRNG key (one per image is split from it), or [B] keys, one per image (keyed by the image, a
      result does not depend on the batch it came in).
    metric: "cosine" (spherical, as the method) or "euclidean" (e.g. a scalar, D = 1).
    n_init, max_iter, tol: k-means settings.

  Returns:
    [B, P] int32 cluster of each patch in {0, 1}, -1 where not valid.
  """
  keys = key if key.shape else jax.random.split(key, x.shape[0])
  return jax.vmap(lambda points, mask, k: kmeans(points, 2, key=k, mask=mask, n_init=n_init, max_iter=max_iter,
                                                 tol=tol, metric=metric).labels)(x, valid, keys)


def prior_foreground_cluster(labels: jax.Array, border: jax.Array, attention: jax.Array, fg_prior: str) -> jax.Array:
  """Which of each image's two clusters the method's prior calls foreground.

  "border": the cluster with the smaller share of its patches on the image
  border; "attention": the one with the higher mean CLS attention. An empty
  cluster is never chosen (so one cluster holding every patch is foreground).

  Args:
    labels: [B, P] int32 in {0, 1}, -1 = not clustered.
    border: [B, P] bool, patch on the border of the valid area.
    attention: [B, P] CLS attention.
    fg_prior: "border" or "attention".

  Returns:
    [B] int32 in {0, 1}.
  """
  onehot = (labels[..., None] == jnp.arange(2)).astype(jnp.float32)  # [B, P, 2]
  count = jnp.sum(onehot, axis=1)
  if fg_prior == "border":
    value = -jnp.sum(onehot * border[..., None], axis=1)  # minus: fewer border patches = more foreground
  elif fg_prior == "attention":
    value = jnp.sum(onehot * jnp.asarray(attention, jnp.float32)[..., None], axis=1)
  else:
    raise ValueError(f"prior_foreground_cluster: fg_prior={fg_prior!r}, expected one of {FG_PRIORS}")
  per_cluster = jnp.where(count > 0, value / jnp.maximum(count, 1.0), -jnp.inf)
  return jnp.argmax(per_cluster, axis=-1).astype(jnp.int32)


def binary_counts(pred: jax.Array, target: jax.Array, counted: jax.Array) -> jax.Array:
  """Per image (tp, fp, fn, tn) over the counted patches.

  Args:
    pred: [B, ...] bool predicted foreground.
    target: [B, ...] bool true foreground.
    counted: [B, ...] bool, patches that are scored (labelled and valid).

  Returns:
    [B, 4] int32.
  """
  axes = tuple(range(1, pred.ndim))
  pred, target = pred & counted, target & counted
  parts = (pred & target, pred & ~target, ~pred & target, counted & ~pred & ~target)
  return jnp.stack([jnp.sum(p, axis=axes, dtype=jnp.int32) for p in parts], axis=-1)


class TwoMeansCounts(NamedTuple):
  """Per image results of `two_means_counts`.

  Attributes:
    prior: [B, 4] (tp, fp, fn, tn) with the foreground cluster chosen by the prior.
    oracle: [B, 4] with the cluster of the higher foreground IoU (the better of the two).
    prior_mask: [B, P] bool foreground by the prior.
  """
  prior: jax.Array
  oracle: jax.Array
  prior_mask: jax.Array


def _iou(counts: jax.Array) -> jax.Array:
  """[...] tp / (tp + fp + fn) of counts [..., 4]; 1 where both masks are empty."""
  union = counts[..., 0] + counts[..., 1] + counts[..., 2]
  return jnp.where(union > 0, counts[..., 0] / jnp.maximum(union, 1), 1.0)


@functools.partial(jax.jit, static_argnames=("fg_prior", "metric", "n_init", "max_iter", "tol"))
def two_means_counts(x: jax.Array, valid: jax.Array, border: jax.Array, attention: jax.Array, target: jax.Array,
                     counted: jax.Array, *, key: jax.Array, fg_prior: str, metric: str = "cosine", n_init: int = 10,
                     max_iter: int = 100, tol: float = 1e-4) -> TwoMeansCounts:
  """Per-image 2-means foreground masks scored against patch labels.

  Args:
    x: [B, P, D] patch features.
    valid: [B, P] bool patches to cluster.
    border: [B, P] bool border patches (for the "border" prior).
    attention: [B, P] CLS attention (for the "attention" prior).
    target: [B, P] bool true foreground.
    counted: [B, P] bool scored patches.
    key: PRNG key for k-means++.
    fg_prior: "border" or "attention".
    metric, n_init, max_iter, tol: see `image_two_means`.

  Returns:
    TwoMeansCounts.
  """
  labels = image_two_means(x, valid, key=key, metric=metric, n_init=n_init, max_iter=max_iter, tol=tol)
  fg = prior_foreground_cluster(labels, border, attention, fg_prior)
  masks = labels[None] == jnp.arange(2)[:, None, None]  # [2, B, P]: cluster c as foreground
  counts = jax.vmap(binary_counts, in_axes=(0, None, None))(masks, target, counted)  # [2, B, 4]
  batch = jnp.arange(x.shape[0])
  oracle = jnp.where((_iou(counts[1]) > _iou(counts[0]))[:, None], counts[1], counts[0])
  return TwoMeansCounts(counts[fg, batch], oracle, masks[fg, batch])


def count_scores(counts) -> dict[str, float]:
  """{"accuracy", "iou"} of (tp, fp, fn, tn) counts [4] summed over a split.

  Raises:
    ValueError: no counted patch.
  """
  tp, fp, fn, tn = (int(c) for c in np.asarray(counts, np.int64))
  total = tp + fp + fn + tn
  if total == 0:
    raise ValueError("count_scores: no labelled patch was scored")
  union = tp + fp + fn
  return {"accuracy": (tp + tn) / total, "iou": tp / union if union else 1.0}


def patch_labels(mask: np.ndarray, grid: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
  """Foreground label of each patch of a ground-truth mask (host numpy; any mask size).

  Pixels are assigned to patches as in `labeling.region_patch_fractions`. A
  patch is ignored when more than half of its pixels are ignore_index;
  otherwise it is foreground when its foreground (non-zero) pixels outnumber
  its background (zero) pixels.

  Args:
    mask: [H, W] int label map, 0 = background.
    grid: (h, w) patch grid.
    ignore_index: label of void pixels.

  Returns:
    [h, w] int8: 1 foreground, 0 background, -1 ignored.
  """
  mask = np.asarray(mask)
  regions = np.where(mask == ignore_index, 2, (mask != 0).astype(np.int64))
  fg_share, void_share = region_patch_fractions(regions, 2, grid)
  bg_share = 1.0 - fg_share - void_share
  labels = (fg_share > bg_share).astype(np.int8)
  return np.where(void_share > 0.5, np.int8(-1), labels)


@jax.jit
def probe_counts(probe: Probe, x: jax.Array, target: jax.Array, counted: jax.Array) -> jax.Array:
  """Per image (tp, fp, fn, tn) [B, 4] of the probe's mask (logit > 0) on x: [B, P, D] against target [B, P]."""
  return binary_counts(probe_logits(probe, x) > 0, target, counted)

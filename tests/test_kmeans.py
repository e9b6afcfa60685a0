"""jaxseg.cluster against scikit-learn's KMeans and brute-force numpy."""

import functools
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from jaxseg import cluster

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = jax.random.key(0)


def _sklearn(x, k, **kwargs):
  return KMeans(k, n_init=kwargs.pop("n_init", 10), random_state=0, **kwargs).fit(np.asarray(x, np.float64))


def _spherical_inertia(x_unit, labels, k):
  """Best spherical k-means cost of a partition: sum over clusters of n_j - ||sum of its unit vectors||."""
  return sum(np.sum(labels == j) - np.linalg.norm(x_unit[labels == j].sum(0)) for j in range(k))


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _anisotropic(seed):
  x, _ = make_blobs(1500, 2, centers=3, random_state=seed)
  return (x @ np.array([[0.6, -0.64], [-0.41, 0.85]])).astype(np.float32)


DATASETS = {
    # Unequal spreads and sizes.
    "blobs_unequal": lambda: make_blobs([600, 300, 100, 50], 5, cluster_std=[0.5, 1.0, 2.5, 4.0],
                                        random_state=0)[0].astype(np.float32),
    "anisotropic": lambda: _anisotropic(170),
    "noise_64d": lambda: np.random.default_rng(0).normal(size=(800, 64)).astype(np.float32),
    "blobs_offset": lambda: (make_blobs(1000, 16, centers=8, random_state=3)[0] + 1000).astype(np.float32),
}


@pytest.mark.parametrize("name,k", [("blobs_unequal", 4), ("anisotropic", 3), ("noise_64d", 6), ("blobs_offset", 8)])
def test_inertia_within_one_percent_of_sklearn(name, k):
  x = DATASETS[name]()
  ours = cluster.kmeans(x, k, key=KEY)
  reference = _sklearn(x, k)
  assert float(ours.inertia) <= 1.01 * reference.inertia_
  # The reported inertia is the cost of the reported partition and centroids.
  centroids = np.asarray(ours.centroids, np.float64)
  labels = np.asarray(ours.labels)
  recomputed = np.sum((x - centroids[labels]) ** 2)
  np.testing.assert_allclose(float(ours.inertia), recomputed, rtol=1e-4)
  np.testing.assert_array_equal(labels, np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), 1))


def test_well_separated_blobs_recovered():
  x, truth = make_blobs([400, 200, 100, 50, 25], 8, cluster_std=[0.3, 0.6, 1.0, 0.5, 0.2], center_box=(-20, 20),
                        random_state=1)
  ours = cluster.kmeans(x.astype(np.float32), 5, key=KEY)
  assert adjusted_rand_score(truth, np.asarray(ours.labels)) >= 0.99


def test_cosine_is_spherical_kmeans_as_good_as_sklearn_on_unit_vectors():
  x, _ = make_blobs(1200, 12, centers=6, cluster_std=2.0, random_state=4)
  x = x.astype(np.float32) * np.random.default_rng(0).uniform(0.5, 3.0, size=(1200, 1)).astype(np.float32)
  x_unit = _unit(x.astype(np.float64))
  ours = cluster.kmeans(x, 6, key=KEY, metric="cosine")
  labels = np.asarray(ours.labels)
  reference = _sklearn(x_unit, 6)
  assert float(ours.inertia) <= 1.01 * _spherical_inertia(x_unit, reference.labels_, 6)
  centroids = np.asarray(ours.centroids, np.float64)
  np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
  cos = x_unit @ centroids.T
  np.testing.assert_array_equal(labels, np.argmax(cos, 1))
  np.testing.assert_allclose(float(ours.inertia), np.sum(1 - cos[np.arange(len(x)), labels]), rtol=1e-4)
  # Its centroids are the renormalised means of its clusters (a fixed point of spherical Lloyd).
  np.testing.assert_allclose(centroids, _unit(np.stack([x_unit[labels == j].mean(0) for j in range(6)])),
                             atol=1e-4)


@pytest.mark.parametrize("tol", [1e-4, 0.2])
def test_from_init_matches_sklearn_lloyd_exactly(tol):
  # One run from given centroids: same iterations, same tolerance rule, same result.
  x, _ = make_blobs(700, 4, centers=5, cluster_std=2.5, random_state=7)
  x = x.astype(np.float64)
  init = x[:5].copy()
  reference = KMeans(5, init=init, n_init=1, tol=tol, max_iter=300).fit(x)
  ours = cluster.kmeans(x.astype(np.float32), 5, key=KEY, init=init.astype(np.float32), tol=tol, max_iter=300)
  np.testing.assert_array_equal(np.asarray(ours.labels), reference.labels_)
  np.testing.assert_allclose(np.asarray(ours.centroids), reference.cluster_centers_, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(ours.inertia), reference.inertia_, rtol=1e-4)


def test_empty_cluster_relocated_like_sklearn():
  # A centroid far from every point starts empty and takes the point farthest from its centroid.
  x, _ = make_blobs(300, 3, centers=3, random_state=2)
  init = np.concatenate([x[:3], [[500.0, 500.0, 500.0]]])
  reference = KMeans(4, init=init, n_init=1).fit(x)
  ours = cluster.kmeans(x.astype(np.float32), 4, key=KEY, init=init.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(ours.labels), reference.labels_)
  np.testing.assert_allclose(np.asarray(ours.centroids), reference.cluster_centers_, rtol=1e-4, atol=1e-4)
  assert np.all(np.bincount(np.asarray(ours.labels), minlength=4) > 0)


def test_masked_equals_unmasked_on_kept_subset():
  x, _ = make_blobs(500, 6, centers=4, cluster_std=1.5, random_state=5)
  x = x.astype(np.float32)
  keep = np.random.default_rng(1).random(500) < 0.7
  padded = x.copy()
  padded[~keep] = np.nan  # padding may hold anything
  for metric in ("euclidean", "cosine"):
    masked = cluster.kmeans(padded, 4, key=KEY, mask=keep, metric=metric)
    subset = cluster.kmeans(x[keep], 4, key=KEY, metric=metric)
    assert np.all(np.asarray(masked.labels)[~keep] == -1)
    np.testing.assert_array_equal(np.asarray(masked.labels)[keep], np.asarray(subset.labels))
    np.testing.assert_allclose(np.asarray(masked.centroids), np.asarray(subset.centroids), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(masked.inertia), float(subset.inertia), rtol=1e-4)


def test_vmapped_two_means_splits_planted_halves():
  rng = np.random.default_rng(0)
  n_images, n_patches, dim = 16, 96, 24
  directions = rng.normal(size=(n_images, 2, dim))
  halves = np.repeat([0, 1], n_patches // 2)
  x = directions[:, halves] + 0.4 * rng.normal(size=(n_images, n_patches, dim))
  n_valid = rng.integers(40, n_patches + 1, size=n_images)
  order = rng.permutation(n_patches)  # planted halves interleaved, padding at the end
  x, truth = x[:, order].astype(np.float32), halves[order]
  mask = np.arange(n_patches)[None] < n_valid[:, None]
  per_image = jax.jit(jax.vmap(functools.partial(cluster.kmeans, k=2, n_init=3, metric="cosine")))
  result = per_image(x, key=jax.random.split(KEY, n_images), mask=mask)
  labels = np.asarray(result.labels)
  for i in range(n_images):
    assert np.all(labels[i, n_valid[i]:] == -1)
    valid_labels, valid_truth = labels[i, :n_valid[i]], truth[:n_valid[i]]
    assert np.all(valid_labels == valid_truth) or np.all(valid_labels == 1 - valid_truth), i
  # vmappable over init as well: restarting from the found centroids changes nothing.
  again = jax.vmap(functools.partial(cluster.kmeans, k=2, metric="cosine"))(
      x, key=jax.random.split(KEY, n_images), mask=mask, init=result.centroids)
  np.testing.assert_array_equal(np.asarray(again.labels), labels)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_degenerate_inputs_are_finite_and_documented(metric):
  same = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (10, 1))
  r = cluster.kmeans(same, 3, key=KEY, metric=metric)
  assert np.all(np.asarray(r.labels) == 0) and float(r.inertia) == pytest.approx(0.0, abs=1e-5)
  expected = same[0] / np.linalg.norm(same[0]) if metric == "cosine" else same[0]
  np.testing.assert_allclose(np.asarray(r.centroids), np.tile(expected, (3, 1)), rtol=1e-5)

  # k larger than the number of distinct points: every distinct point gets its own centroid.
  three = np.repeat(np.eye(3, dtype=np.float32) * 5, 4, axis=0)
  r = cluster.kmeans(three, 5, key=KEY, metric=metric)
  labels = np.asarray(r.labels)
  assert len(np.unique(labels)) == 3 and float(r.inertia) == pytest.approx(0.0, abs=1e-5)
  assert np.all(np.isfinite(np.asarray(r.centroids)))

  # N < k.
  r = cluster.kmeans(np.arange(6, dtype=np.float32).reshape(2, 3) + 1, 4, key=KEY, metric=metric)
  assert len(set(np.asarray(r.labels).tolist())) == 2
  assert np.all(np.isfinite(np.asarray(r.centroids))) and float(r.inertia) == pytest.approx(0.0, abs=1e-5)

  # Fully masked: labels -1, inertia 0, centroids zero (or init).
  nan_rows = np.full((6, 3), np.nan, np.float32)
  r = cluster.kmeans(nan_rows, 2, key=KEY, mask=np.zeros(6, bool), metric=metric)
  assert np.all(np.asarray(r.labels) == -1) and float(r.inertia) == 0.0
  np.testing.assert_array_equal(np.asarray(r.centroids), np.zeros((2, 3)))
  init = np.ones((2, 3), np.float32)
  r = cluster.kmeans(nan_rows, 2, key=KEY, mask=np.zeros(6, bool), metric=metric, init=init)
  np.testing.assert_array_equal(np.asarray(r.centroids), init)

  # A single valid point.
  r = cluster.kmeans(same, 2, key=KEY, mask=np.arange(10) == 3, metric=metric)
  assert np.asarray(r.labels).tolist() == [-1] * 3 + [0] + [-1] * 6
  np.testing.assert_allclose(np.asarray(r.centroids), np.tile(expected, (2, 1)), rtol=1e-5)


def test_bad_input_names_the_shape():
  x = np.zeros((5, 3), np.float32)
  with pytest.raises(ValueError, match="mask"):
    cluster.kmeans(x, 2, key=KEY, mask=np.ones(4, bool))
  with pytest.raises(ValueError, match="init"):
    cluster.kmeans(x, 2, key=KEY, init=np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    cluster.kmeans(x[0], 2, key=KEY)
  with pytest.raises(ValueError, match="metric"):
    cluster.kmeans(x, 2, key=KEY, metric="manhattan")


def test_assign_and_distances_match_brute_force():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(50, 7)).astype(np.float32)
  centroids = rng.normal(size=(4, 7)).astype(np.float32)
  mask = rng.random(50) < 0.8
  squared = ((x[:, None].astype(np.float64) - centroids[None]) ** 2).sum(-1)
  np.testing.assert_allclose(np.asarray(cluster.distances(x, centroids)), squared, rtol=1e-4, atol=1e-4)
  cos = _unit(x.astype(np.float64)) @ _unit(centroids.astype(np.float64)).T
  np.testing.assert_allclose(np.asarray(cluster.distances(x, centroids, "cosine")), 1 - cos, atol=1e-5)
  labels, distance = cluster.assign_with_distance(x, centroids, mask=mask)
  np.testing.assert_array_equal(np.asarray(labels), np.where(mask, squared.argmin(1), -1))
  np.testing.assert_allclose(np.asarray(distance), np.where(mask, squared.min(1), 0), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(cluster.assign(x, centroids, "cosine")), cos.argmax(1))


@pytest.mark.parametrize("budget,batch", [(6, 7), (10, 4)])
def test_reservoir_sample_is_uniform_and_skips_padding(budget, batch):
  n_points, n_keys = 23, 4000
  padding = jnp.array([4, 11, 17])  # masked points, never sampled or counted

  def sample(key):
    state = cluster.reservoir_init(budget, 1)
    for start in range(0, n_points, batch):
      index = start + jnp.arange(batch)
      x = jnp.where(index < n_points, index, -1).astype(jnp.float32)[:, None]
      mask = (index < n_points) & ~jnp.isin(index, padding)
      state = cluster.reservoir_add(state, x, key=jax.random.fold_in(key, start), mask=mask)
    return state

  states = jax.jit(jax.vmap(sample))(jax.random.split(KEY, n_keys))
  assert np.all(np.asarray(states.mask)) and np.all(np.asarray(states.n_seen) == n_points - 3)
  picked = np.asarray(states.points[..., 0]).astype(int)
  assert all(len(set(row)) == budget for row in picked)  # without replacement
  frequency = np.bincount(picked.ravel(), minlength=n_points) / n_keys
  np.testing.assert_array_equal(frequency[np.asarray(padding)], 0)
  expected = budget / (n_points - 3)
  std = np.sqrt(expected * (1 - expected) / n_keys)
  kept = np.setdiff1d(np.arange(n_points), padding)
  assert np.all(np.abs(frequency[kept] - expected) < 5 * std), frequency


def test_donated_add_equals_plain_add():
  x = np.random.default_rng(5).normal(size=(40, 3)).astype(np.float32)
  state = cluster.reservoir_add(cluster.reservoir_init(16, 3), x[:20], key=KEY)
  plain = cluster.reservoir_add(state, x[20:], key=jax.random.key(1))
  donated = cluster.reservoir_add_donated(jax.tree.map(jnp.copy, state), x[20:], key=jax.random.key(1))
  for a, b in zip(plain, donated):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stream_helpers_match_direct_calls():
  rng = np.random.default_rng(4)
  chunks = [rng.normal(size=(100, 5)).astype(np.float32) + 8 * (i % 2) for i in range(5)]
  chunks.append((rng.normal(size=(30, 5)).astype(np.float32), np.arange(30) < 20))  # short, masked chunk
  state = cluster.reservoir_sample(chunks, 1000, key=KEY)  # budget above the stream: keeps every valid point
  assert int(state.n_seen) == 520 and int(np.sum(np.asarray(state.mask))) == 520
  kept = np.sort(np.asarray(state.points)[np.asarray(state.mask)], axis=0)
  everything = np.concatenate(chunks[:5] + [chunks[5][0][:20]])
  np.testing.assert_array_equal(kept, np.sort(everything, axis=0))
  result = cluster.reservoir_kmeans(state, 2, key=KEY)
  labels = list(cluster.assign_chunks(chunks, result.centroids))
  assert [len(l) for l in labels] == [100] * 5 + [30]
  np.testing.assert_array_equal(np.asarray(labels[-1][20:]), -1)
  direct = cluster.assign(np.concatenate(chunks[:5]), result.centroids)
  np.testing.assert_array_equal(np.concatenate([np.asarray(l) for l in labels[:5]]), np.asarray(direct))


_STREAM_SCRIPT = textwrap.dedent("""
    import json, resource
    import jax, numpy as np
    from jaxseg import cluster
    CHUNK, DIM = 50_000, 64

    def chunks(n_chunks):
      for i in range(n_chunks):
        rng = np.random.default_rng(i)
        yield rng.standard_normal((CHUNK, DIM), dtype=np.float32) + 4 * (i % 2)

    def peak_mb():
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def sample_cluster_assign(n_chunks):
      state = cluster.reservoir_sample(chunks(n_chunks), 100_000, key=jax.random.key(0))
      result = cluster.reservoir_kmeans(state, 2, key=jax.random.key(1), n_init=2)
      sizes = np.zeros(2, np.int64)
      for labels in cluster.assign_chunks(chunks(n_chunks), result.centroids):
        sizes += np.bincount(np.asarray(labels), minlength=2)
      return int(state.n_seen), sorted(sizes.tolist())

    imports_mb = peak_mb()
    sample_cluster_assign(2)  # compiles everything
    sample_cluster_assign(10)  # 500,000 points
    small_mb = peak_mb()
    n_seen, sizes = sample_cluster_assign(100)  # 5,000,000 points, 1.28 GB as float32
    print(json.dumps(dict(imports_mb=imports_mb, small_mb=small_mb, peak_mb=peak_mb(), n_seen=n_seen, sizes=sizes)))
""")


@pytest.mark.slow
def test_streaming_five_million_points_in_bounded_memory():
  # Bounds: peak RSS over the whole run < RSS after imports + 640 MB (half the 1.28 GB streamed), and
  # 5M points raise it by < 64 MB over 0.5M points (the allocator's noise): memory does not grow with N.
  out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["n_seen"] == 5_000_000 and report["sizes"] == [2_500_000, 2_500_000], report
  assert report["peak_mb"] - report["imports_mb"] < 640, report
  assert report["peak_mb"] - report["small_mb"] < 64, report

"""k-means: jaxseg.cluster.kmeans against scikit-learn's KMeans, same k, n_init, max_iter, tol.

(a) 2-means inside each of 64 images x 1024 patches x 384 dims (vmapped) vs a loop of KMeans.
(b) k=20 over 200,000 x 384 points vs one KMeans.
Rows give time ratio (jaxseg / sklearn) and inertia ratio (summed over images for (a)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from experiments.benchmarks.common import best_time
from experiments.benchmarks.common import row
from jaxseg.cluster import kmeans

N_INIT = 10
MAX_ITER = 100
TOL = 1e-4


def _blobs(rng: np.random.Generator, n: int, dim: int, n_centers: int, spread: float) -> np.ndarray:
  """[n, dim] float32 unit-norm points around n_centers random directions, like ViT patch features."""
  centers = rng.normal(size=(n_centers, dim))
  points = centers[rng.integers(n_centers, size=n)] + spread * rng.normal(size=(n, dim))
  return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _sklearn(x: np.ndarray, k: int, seed: int) -> float:
  return KMeans(k, n_init=N_INIT, max_iter=MAX_ITER, tol=TOL, random_state=seed).fit(x).inertia_


def per_image(n_images: int = 64, n_patches: int = 1024, dim: int = 384) -> None:
  rng = np.random.default_rng(0)
  images = np.stack([_blobs(rng, n_patches, dim, 3, 1.5) for _ in range(n_images)])
  keys = jax.random.split(jax.random.key(0), n_images)
  cluster = jax.jit(jax.vmap(functools.partial(kmeans, k=2, n_init=N_INIT, max_iter=MAX_ITER, tol=TOL)))
  images_device = jnp.asarray(images)
  result = cluster(images_device, key=keys)
  jax_s = best_time(lambda: cluster(images_device, key=keys).inertia.block_until_ready(), repeat=3)
  ref_inertia = [0.0]

  def reference():
    ref_inertia[0] = sum(_sklearn(image, 2, seed) for seed, image in enumerate(images))

  ref_s = best_time(reference, repeat=1)
  ratio = float(jnp.sum(result.inertia)) / ref_inertia[0]
  row(f"kmeans k=2, {n_images} images x {n_patches} x {dim}", jax_s, ref_s,
      extra=f"inertia ratio {ratio:.4f}x")


def dataset(n: int = 200_000, dim: int = 384, k: int = 20) -> None:
  x = _blobs(np.random.default_rng(1), n, dim, 30, 1.0)
  x_device = jnp.asarray(x)
  cluster = jax.jit(functools.partial(kmeans, k=k, n_init=N_INIT, max_iter=MAX_ITER, tol=TOL))
  result = cluster(x_device, key=jax.random.key(0))
  jax_s = best_time(lambda: cluster(x_device, key=jax.random.key(0)).inertia.block_until_ready(), repeat=1)
  ref_inertia = [0.0]

  def reference():
    ref_inertia[0] = _sklearn(x, k, 0)

  ref_s = best_time(reference, repeat=1, warmup=0)
  row(f"kmeans k={k}, {n} x {dim}", jax_s, ref_s,
      extra=f"inertia ratio {float(result.inertia) / ref_inertia[0]:.4f}x")


def run() -> None:
  per_image()
  dataset()


if __name__ == "__main__":
  run()

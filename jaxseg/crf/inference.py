"""Mean-field inference in a fully connected CRF, as pydensecrf's DenseCRF2D computes it."""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf.lattice import Lattice, build_lattice, compact, lattice_filter


def gaussian_features(height: int, width: int, sxy: float) -> jnp.ndarray:
  """[H*W, 2] float32 features (x / sxy, y / sxy), row-major pixels."""
  y, x = np.mgrid[:height, :width].astype(np.float32)
  return jnp.asarray(np.stack([x, y], axis=-1).reshape(-1, 2) / np.float32(sxy))


@functools.lru_cache(maxsize=16)
def gaussian_kernel(height: int, width: int, sxy: float) -> Tuple[Lattice, np.ndarray]:
  """The position-only lattice and its symmetric norm [N, 1].

  Both are functions of static sizes: built once per shape, compacted to M
  lattice points, and embedded as constants.
  """
  with jax.ensure_compile_time_eval():
    lattice = compact(jax.jit(build_lattice)(gaussian_features(height, width, sxy)))
    return lattice, np.asarray(jax.jit(symmetric_norm)(lattice))


def bilateral_features(image: jnp.ndarray, sxy: float, srgb: float) -> jnp.ndarray:
  """[H*W, 5] float32 features (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb). image: [H, W, 3] uint8."""
  height, width, _ = image.shape
  colour = image.reshape(-1, 3).astype(jnp.float32) / np.float32(srgb)
  return jnp.concatenate([gaussian_features(height, width, sxy), colour], axis=-1)


def symmetric_norm(lattice: Lattice) -> jnp.ndarray:
  """[N, 1] float32: 1 / sqrt(K 1 + 1e-20), pydensecrf's NORMALIZE_SYMMETRIC."""
  num_inputs = lattice.offsets.shape[0]
  return jax.lax.rsqrt(lattice_filter(lattice, jnp.ones((num_inputs, 1), jnp.float32)) + 1e-20)


def mean_field(unary: jnp.ndarray, lattices, norms, weights, iterations: int) -> jnp.ndarray:
  """Q = softmax(-U); then `iterations` times Q = softmax(-U + sum_k w_k n_k K_k(n_k Q)).

  Args:
    unary: [N, L] float32.
    lattices, norms, weights: one per kernel (Lattice, [N, 1] float32, Potts weight).
    iterations: static.

  Returns:
    Q: [N, L] float32.
  """
  def step(_, q):
    logits = -unary
    for lattice, norm, weight in zip(lattices, norms, weights):
      logits = logits + np.float32(weight) * norm * lattice_filter(lattice, norm * q)
    return jax.nn.softmax(logits, axis=-1)

  return jax.lax.fori_loop(0, iterations, step, jax.nn.softmax(-unary, axis=-1))


def dense_crf(image: jnp.ndarray, unary: jnp.ndarray, *, iterations: int = 10,
              gaussian_sxy: float = 3.0, gaussian_weight: float = 3.0,
              bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0,
              bilateral_weight: float = 10.0) -> jnp.ndarray:
  """Marginals of a dense CRF with a Gaussian and a bilateral Potts kernel.

  Args:
    image: [H, W, 3] uint8.
    unary: [H, W, L] float32, negative log-probabilities.
    iterations, gaussian_*, bilateral_*: as pydensecrf's inference(n),
      addPairwiseGaussian(sxy, compat) and addPairwiseBilateral(sxy, srgb, compat).

  Returns:
    Q: [H, W, L] float32.
  """
  height, width, num_labels = unary.shape
  gaussian, gaussian_norm = gaussian_kernel(height, width, float(gaussian_sxy))
  bilateral = build_lattice(bilateral_features(image, bilateral_sxy, bilateral_srgb))
  lattices = (gaussian, bilateral)
  norms = (jnp.asarray(gaussian_norm), symmetric_norm(bilateral))
  q = mean_field(unary.reshape(-1, num_labels).astype(jnp.float32), lattices, norms,
                 (gaussian_weight, bilateral_weight), iterations)
  return q.reshape(height, width, num_labels)

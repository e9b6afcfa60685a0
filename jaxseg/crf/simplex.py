"""Permutohedral embedding: each feature's enclosing simplex and barycentric weights.

Follows Adams, Baek & Davis (2010) with the exact float32 conventions of
Krähenbühl's permutohedral.cpp (the code inside pydensecrf): the same scale
factors, elevation order, rounding and rank tie-breaking, so that every point
lands in the same simplex with the same weights as in the reference.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Simplices(NamedTuple):
  """Each feature's enclosing simplex.

  keys: [N, d+1, d] int32, lattice coordinates of the simplex's d+1 vertices
    (the (d+1)-th coordinate is implied: coordinates sum to zero).
  weights: [N, d+1] float32, barycentric weights of those vertices (sum to 1).
  """
  keys: jnp.ndarray
  weights: jnp.ndarray


def scale_factors(dim: int) -> np.ndarray:
  """Diagonal of the elevation matrix, [d] float32, as in the reference (p.5-6 of Adams et al.)."""
  inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (dim + 1))
  i = np.arange(dim, dtype=np.float64)
  return (1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std_dev)).astype(np.float32)


def elevate(features: jnp.ndarray) -> jnp.ndarray:
  """Embeds features in the hyperplane sum(x) = 0 of R^{d+1}.

  Args:
    features: [N, d] float32.

  Returns:
    [N, d+1] float32, accumulated in the reference's order (last feature first).
  """
  dim = features.shape[-1]
  scaled = features * jnp.asarray(scale_factors(dim))
  running_sum = jnp.zeros(features.shape[:-1], jnp.float32)
  elevated = [None] * (dim + 1)
  for j in range(dim, 0, -1):
    cf = scaled[..., j - 1]
    elevated[j] = running_sum - np.float32(j) * cf
    running_sum = running_sum + cf
  elevated[0] = running_sum
  return jnp.stack(elevated, axis=-1)


def enclosing_simplices(features: jnp.ndarray) -> Simplices:
  """Finds each feature's enclosing simplex in the permutohedral lattice A*_d.

  Args:
    features: [N, d] float32, already divided by the kernel's standard deviations.

  Returns:
    Simplices with keys [N, d+1, d] int32 and weights [N, d+1] float32.
  """
  dim = features.shape[-1]
  n_vertices = dim + 1
  down = np.float32(1.0 / n_vertices)
  up = np.float32(n_vertices)
  elevated = elevate(features.astype(jnp.float32))

  # Nearest remainder-0 lattice point; rounding half to even as SSE's cvtps does.
  quotient = jnp.round(elevated * down)
  rem0 = quotient * up
  coord_sum = jnp.sum(quotient, axis=-1, keepdims=True)

  # rank[i]: position of coordinate i in the descending order of the residuals.
  residual = elevated - rem0
  less = residual[..., :, None] < residual[..., None, :]  # [N, d+1, d+1]: res_i < res_j
  upper = np.triu(np.ones((n_vertices, n_vertices), bool), k=1)  # j > i
  rank = (jnp.sum(less & upper, axis=-1) + jnp.sum(~less & upper, axis=-2)).astype(jnp.float32)

  # Bring the point back onto the plane sum(rem0) = 0.
  rank = rank + coord_sum
  add = jnp.where(rank < 0, up, 0.0) - jnp.where(rank >= up, up, 0.0)
  rank = (rank + add).astype(jnp.int32)
  rem0 = rem0 + add

  # Barycentric weights (p.10): u[p] is the residual of the coordinate of rank d - p.
  scaled_residual = (elevated - rem0) * down
  position = dim - rank  # [N, d+1], a permutation of 0..d
  onehot = position[..., :, None] == jnp.arange(n_vertices)  # [N, i, p]
  u = jnp.sum(jnp.where(onehot, scaled_residual[..., :, None], 0.0), axis=-2)  # [N, d+1]
  weights = jnp.concatenate([u[..., :1] + (1.0 - u[..., -1:]), u[..., 1:] - u[..., :-1]], axis=-1)

  # Vertex r = rem0 + canonical simplex r, canonical[r][k] = r - (d+1) if rank[k] > d - r.
  remainder = jnp.arange(n_vertices, dtype=jnp.int32)[:, None]  # [d+1, 1]
  rem0_int = rem0[..., None, :dim].astype(jnp.int32)  # [N, 1, d]
  wraps = rank[..., None, :dim] > (dim - remainder)  # [N, d+1, d]
  keys = rem0_int + remainder - jnp.where(wraps, n_vertices, 0)
  return Simplices(keys=keys.astype(jnp.int32), weights=weights.astype(jnp.float32))

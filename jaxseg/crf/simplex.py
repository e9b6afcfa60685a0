"""Permutohedral embedding: each feature's enclosing simplex and barycentric weights.

Follows Adams, Baek & Davis (2010) with the exact float32 conventions of
Krähenbühl's permutohedral.cpp (the code inside pydensecrf): the same scale
factors, elevation order, rounding and rank tie-breaking, so that every point
lands in the same simplex with the same weights as in the reference.

Everything is computed one coordinate at a time on [N] vectors (the reference's
pairwise rank loop, unrolled), which XLA turns into a few vectorised loops.
"""

from typing import List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Simplices(NamedTuple):
  """Each feature's enclosing simplex.

  keys: [d+1, N, d] int32, lattice coordinates of vertex r of each point's
    simplex (the (d+1)-th coordinate is implied: coordinates sum to zero);
    [d+1, N, d+1] with the point's segment as a last word.
  weights: [N, d+1] float32, barycentric weights of those vertices (sum to 1).
  """
  keys: jnp.ndarray
  weights: jnp.ndarray


def scale_factors(dim: int) -> np.ndarray:
  """Diagonal of the elevation matrix, [d] float32, as in the reference (p.5-6 of Adams et al.)."""
  inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (dim + 1))
  i = np.arange(dim, dtype=np.float64)
  return (1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std_dev)).astype(np.float32)


def elevate(features: jnp.ndarray) -> List[jnp.ndarray]:
  """Embeds features in the hyperplane sum(x) = 0 of R^{d+1}.

  Args:
    features: [N, d] float32.

  Returns:
    d+1 coordinates, each [N] float32, accumulated in the reference's order (last feature first).
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
  return elevated


def enclosing_simplices(features: jnp.ndarray, segment: Optional[jnp.ndarray] = None) -> Simplices:
  """Finds each feature's enclosing simplex in the permutohedral lattice A*_d.

  Args:
    features: [N, d] float32, already divided by the kernel's standard deviations.
    segment: optional [N] int32, appended to every key as a last word (written in the same loop as the
      coordinates: a concatenation afterwards copied all the keys).

  Returns:
    Simplices with keys [d+1, N, d] int32 ([d+1, N, d+1] with a segment) and weights [N, d+1] float32.
  """
  dim = features.shape[-1]
  n_vertices = dim + 1
  down = np.float32(1.0 / n_vertices)
  up = np.float32(n_vertices)
  elevated = elevate(features.astype(jnp.float32))

  # Nearest remainder-0 lattice point; rounding half to even as SSE's cvtps does.
  quotient = [jnp.round(v * down) for v in elevated]
  rem0 = [q * up for q in quotient]
  coord_sum = sum(q.astype(jnp.int32) for q in quotient)

  # rank[i]: position of coordinate i in the descending order of the residuals (reference's loop).
  residual = [v - r for v, r in zip(elevated, rem0)]
  rank = [coord_sum] * n_vertices  # then brought back onto the plane sum(rem0) = 0
  for i in range(n_vertices):
    for j in range(i + 1, n_vertices):
      less = residual[i] < residual[j]
      rank[i] = rank[i] + less.astype(jnp.int32)
      rank[j] = rank[j] + (~less).astype(jnp.int32)
  adds = [jnp.where(k < 0, n_vertices, 0) - jnp.where(k >= n_vertices, n_vertices, 0) for k in rank]
  rank = [k + a for k, a in zip(rank, adds)]
  rem0 = [r + a.astype(jnp.float32) for r, a in zip(rem0, adds)]

  # Per-point arrays materialised once (a barrier): fused into the keys' and weights' consumers,
  # XLA recomputed the whole simplex for each use. The weights are then one vectorised [N, d+1]
  # expression: a loop writing them per vertex into [d+1, N], then transposed, took a third longer.
  rank, rem0_int, scaled_residual = jax.lax.optimization_barrier((
      jnp.stack(rank, axis=-1),  # [N, d+1]
      jnp.stack([r.astype(jnp.int32) for r in rem0[:dim]], axis=-1),  # [N, d]
      jnp.stack([(v - r) * down for v, r in zip(elevated, rem0)], axis=-1)))  # [N, d+1]

  def vertex(r, keys):
    """Vertex r = rem0 + canonical simplex r, canonical[r][k] = r - (d+1) if rank[k] > d - r."""
    key = rem0_int + r - jnp.where(rank[:, :dim] > dim - r, n_vertices, 0)
    if segment is not None:
      key = jnp.concatenate([key, segment.astype(jnp.int32)[:, None]], axis=-1)
    return jax.lax.dynamic_update_index_in_dim(keys, key, r, axis=0)

  num_inputs = rank.shape[0]
  keys = jax.lax.fori_loop(0, n_vertices, vertex,
                           jnp.zeros((n_vertices, num_inputs, dim + (segment is not None)), jnp.int32))

  # u[:, p] (p.10 of Adams et al.): the scaled residual of the coordinate of rank d - p.
  wanted = dim - np.arange(n_vertices, dtype=np.int32)
  u = jnp.broadcast_to(scaled_residual[:, :1], scaled_residual.shape)
  for k in range(1, n_vertices):
    u = jnp.where(rank[:, k:k + 1] == wanted, scaled_residual[:, k:k + 1], u)
  weights = jnp.concatenate([u[:, :1] + (1.0 - u[:, dim:]), u[:, 1:] - u[:, :dim]], axis=-1)
  return Simplices(keys=keys, weights=weights)

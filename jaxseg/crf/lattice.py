"""Gaussian filtering with the permutohedral lattice (Adams, Baek & Davis 2010).

Matches Krähenbühl's permutohedral.cpp (inside pydensecrf): splat onto the
vertices of each point's enclosing simplex with barycentric weights, blur with
[1/2, 1, 1/2] along each of the d+1 lattice directions in turn (0..d), slice
back with the same weights and scale by alpha = 1 / (1 + 2^-d).

The number of lattice points M is data dependent; arrays are sized by a static
capacity C (at most N*(d+1), which always suffices). Build once per feature
set, then filter any number of value arrays.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import hash_table
from jaxseg.crf.simplex import enclosing_simplices


class Lattice(NamedTuple):
  """A built permutohedral lattice (a pytree of arrays).

  offsets: [N, d+1] int32, lattice point of each simplex vertex of each input point.
  weights: [N, d+1] float32, barycentric weights of those vertices.
  neighbors: [d+1, 2, C+1] int32, for each direction and lattice point the two
    blur neighbours (-1 and +1 steps); C (a zero row) where absent. Row C is
    the zero row itself.
  num_points: [] int32, M, the number of lattice points in use.
  """
  offsets: jnp.ndarray
  weights: jnp.ndarray
  neighbors: jnp.ndarray
  num_points: jnp.ndarray

  @property
  def capacity(self) -> int:
    return self.neighbors.shape[-1] - 1


def max_points(num_inputs: int, dim: int) -> int:
  """Static bound on the number of lattice points: N*(d+1)."""
  return num_inputs * (dim + 1)


def _neighbor_steps(dim: int) -> np.ndarray:
  """[d+1, 2, d] int32: key offsets of the -1 and +1 blur neighbours along each direction."""
  steps = np.empty((dim + 1, 2, dim), np.int32)
  steps[:, 0, :] = -1
  steps[:, 1, :] = 1
  for j in range(dim):
    steps[j, 0, j] = dim
    steps[j, 1, j] = -dim
  return steps


def points_and_table(features: jnp.ndarray):
  """First half of the build, independent of the capacity.

  Args:
    features: [N, d] float32.

  Returns:
    (simplex keys [N*(d+1), d] int32, weights [N, d+1], hash table of the keys).
  """
  simplices = enclosing_simplices(features)
  dim = features.shape[-1]
  keys = simplices.keys.reshape(-1, dim)
  return keys, simplices.weights, hash_table.insert(keys)


def finish_lattice(keys: jnp.ndarray, weights: jnp.ndarray, table: hash_table.HashTable,
                   capacity: int) -> Lattice:
  """Second half of the build: blur neighbours of the first `capacity` lattice points.

  Args:
    keys: [N*(d+1), d] int32, from points_and_table.
    weights: [N, d+1] float32.
    table: the hash table of keys.
    capacity: static C >= table.num_unique for a valid lattice.

  Returns:
    Lattice with capacity C.
  """
  num_entries, dim = keys.shape
  point_ids = jnp.arange(capacity, dtype=jnp.int32)
  occupied_slots = table.owner < num_entries
  # Entry that owns each lattice point's slot (the point's key).
  point_entry = jnp.zeros((capacity,), jnp.int32).at[
      jnp.where(occupied_slots, table.slot_id, capacity)].set(table.owner, mode="drop")
  point_keys = keys[point_entry]  # [C, d]
  queries = point_keys[:, None, None, :] + jnp.asarray(_neighbor_steps(dim))  # [C, d+1, 2, d]
  valid = jnp.broadcast_to((point_ids < table.num_unique)[:, None, None], queries.shape[:-1])
  found = hash_table.lookup(table, keys, queries.reshape(-1, dim), valid.reshape(-1))
  found = jnp.where((found < 0) | (found >= capacity), capacity, found)
  neighbors = jnp.transpose(found.reshape(capacity, dim + 1, 2), (1, 2, 0))
  neighbors = jnp.concatenate([neighbors, jnp.full((dim + 1, 2, 1), capacity, jnp.int32)], axis=-1)
  offsets = table.entry_id.reshape(weights.shape)
  return Lattice(offsets=offsets, weights=weights, neighbors=neighbors, num_points=table.num_unique)


def build_lattice(features: jnp.ndarray, capacity: Optional[int] = None) -> Lattice:
  """Builds the permutohedral lattice of a point set.

  Args:
    features: [N, d] float32, positions already divided by the Gaussian's
      standard deviation along each axis (pydensecrf's convention).
    capacity: static number of lattice points to make room for; defaults to
      N*(d+1), which can never overflow. With a smaller capacity, a lattice
      whose num_points exceeds it is invalid and lattice_filter returns NaN
      for it (check lattice.num_points).

  Returns:
    Lattice.
  """
  num_inputs, dim = features.shape
  if capacity is None:
    capacity = max_points(num_inputs, dim)
  keys, weights, table = points_and_table(features)
  return finish_lattice(keys, weights, table, capacity)


def lattice_filter(lattice: Lattice, values: jnp.ndarray) -> jnp.ndarray:
  """Approximate Gaussian filter: out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j, as pydensecrf computes it.

  Args:
    lattice: from build_lattice(features [N, d]).
    values: [N, L] float32.

  Returns:
    [N, L] float32. NaN everywhere if the lattice overflowed its capacity.
  """
  num_inputs, num_values = values.shape
  dim = lattice.offsets.shape[-1] - 1
  capacity = lattice.capacity
  contributions = lattice.weights[:, :, None] * values[:, None, :]  # [N, d+1, L]
  grid = jax.ops.segment_sum(contributions.reshape(-1, num_values), lattice.offsets.reshape(-1),
                             num_segments=capacity + 1)
  for direction in range(dim + 1):
    minus, plus = lattice.neighbors[direction, 0], lattice.neighbors[direction, 1]
    grid = grid + 0.5 * (grid[minus] + grid[plus])
  alpha = np.float32(1.0 / (1.0 + 2.0 ** -dim))
  out = jnp.zeros((num_inputs, num_values), jnp.float32)
  for r in range(dim + 1):
    out = out + (lattice.weights[:, r:r + 1] * alpha) * grid[lattice.offsets[:, r]]
  return jnp.where(lattice.num_points <= capacity, out, jnp.nan)

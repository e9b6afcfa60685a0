"""Gaussian filtering with the permutohedral lattice (Adams, Baek & Davis 2010).

Matches Krähenbühl's permutohedral.cpp (inside pydensecrf): splat onto the
vertices of each point's enclosing simplex with barycentric weights, blur with
[1/2, 1, 1/2] along each of the d+1 lattice directions in turn (0..d), slice
back with the same weights and scale by alpha = 1 / (1 + 2^-d).

The number of lattice points M is data dependent while XLA shapes are static.
A lattice is sized for a static capacity C (N*(d+1) by default, which can never
overflow) and carries a static ladder of smaller capacities C, C/4, C/16, ...;
each filter runs (through lax.switch) at the smallest rung that holds M, so
the blur costs what the lattice actually uses; the blur-neighbour search runs
chunk by chunk in a loop whose trip count follows M. Build once per feature
set, then filter any number of value arrays.
"""

import functools
from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import hash_table
from jaxseg.crf.simplex import enclosing_simplices

_LADDER_FACTOR = 4
_LADDER_MIN = 2048
_SEARCH_CHUNK = 8192


@flax.struct.dataclass
class Lattice:
  """A built permutohedral lattice (a pytree; `capacities` is static).

  offsets: [N, d+1] int32, lattice point (0..M-1) of each simplex vertex of each input point.
  weights: [N, d+1] float32, barycentric weights of those vertices.
  neighbors: [d+1, 2, C+1] int32, for each direction and lattice point its -1
    and +1 blur neighbours, or C (a zero row) where absent; row C is the zero row.
  num_points: [] int32, M.
  capacities: static, descending capacities whose first is C; filters run at
    the smallest one >= M.
  """
  offsets: jnp.ndarray
  weights: jnp.ndarray
  neighbors: jnp.ndarray
  num_points: jnp.ndarray
  capacities: Tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def capacity(self) -> int:
    return self.capacities[0]


def max_points(num_inputs: int, dim: int) -> int:
  """Static bound on the number of lattice points of N inputs in d dimensions: N*(d+1)."""
  return num_inputs * (dim + 1)


def capacity_ladder(capacity: int) -> Tuple[int, ...]:
  """C, C/4, C/16, ... down to about 2048 (descending, static)."""
  rungs = [capacity]
  while rungs[-1] // _LADDER_FACTOR >= _LADDER_MIN:
    rungs.append(-(-rungs[-1] // _LADDER_FACTOR))
  return tuple(rungs)


def _rung(num_points: jnp.ndarray, capacities: Tuple[int, ...]) -> jnp.ndarray:
  """Index of the smallest capacity >= num_points (0 if none, i.e. overflow)."""
  fits = num_points <= jnp.asarray(capacities, jnp.int32)
  return jnp.maximum(jnp.sum(fits, dtype=jnp.int32) - 1, 0)


def _plus_steps(dim: int) -> np.ndarray:
  """[d+1, d] int32: key offset of the +1 blur neighbour along each direction (the -1 one is its negation)."""
  steps = np.ones((dim + 1, dim), np.int32)
  steps[np.arange(dim), np.arange(dim)] = -dim
  return steps


def _find_neighbors(keys: jnp.ndarray, table: hash_table.HashTable, capacity: int) -> jnp.ndarray:
  """Blur neighbours of every lattice point, searched chunk by chunk so the work follows M.

  Args:
    keys: [E, d] int32, the keys the table was built from.
    table: their hash table.
    capacity: static C.

  Returns:
    [d+1, 2, C+1] int32: -1 and +1 neighbours along each direction, C where absent.
  """
  num_entries, dim = keys.shape
  chunk = min(_SEARCH_CHUNK, capacity)
  width = -(-capacity // chunk) * chunk
  first_entry = jnp.pad(table.first_entry, (0, max(0, width - num_entries)))
  steps = jnp.asarray(_plus_steps(dim))
  num_points = jnp.minimum(table.num_unique, capacity)

  def search(i, found):
    plus, minus = found
    start = i * chunk
    point = start + jnp.arange(chunk, dtype=jnp.int32)
    queries = keys[jax.lax.dynamic_slice(first_entry, (start,), (chunk,))][:, None, :] + steps  # [chunk, d+1, d]
    in_use = jnp.broadcast_to((point < num_points)[:, None], queries.shape[:-1])
    hit = hash_table.lookup(table, keys, queries.reshape(-1, dim), in_use.reshape(-1)).reshape(chunk, dim + 1).T
    hit = jnp.where((hit < 0) | (hit >= capacity), capacity, hit)  # [d+1, chunk]
    plus = jax.lax.dynamic_update_slice(plus, hit, (0, start))
    # b is a's +1 neighbour exactly when a is b's -1 neighbour.
    minus = jax.vmap(lambda row, h: row.at[h].set(point, mode="drop"))(minus, jnp.where(hit < capacity, hit, width + 1))
    return plus, minus

  absent = jnp.full((dim + 1, width + 1), capacity, jnp.int32)
  num_chunks = (num_points + chunk - 1) // chunk
  plus, minus = jax.lax.fori_loop(0, num_chunks, search, (absent, absent))
  neighbors = jnp.stack([minus, plus], axis=1)[:, :, :capacity + 1]
  return neighbors.at[:, :, capacity].set(capacity)


def build_lattice(features: jnp.ndarray, capacity: Optional[int] = None) -> Lattice:
  """Builds the permutohedral lattice of a point set.

  Args:
    features: [N, d] float32, positions already divided by the Gaussian's
      standard deviation along each axis (pydensecrf's convention).
    capacity: static number of lattice points to make room for; defaults to
      N*(d+1), which can never overflow. With a smaller capacity, overflow
      raises ValueError when features are concrete; under jit it cannot, and
      lattice_filter returns NaN for the overflowing lattice.

  Returns:
    Lattice.
  """
  num_inputs, dim = features.shape
  if capacity is None:
    capacity = max_points(num_inputs, dim)
  simplices = enclosing_simplices(features)
  keys = simplices.keys.reshape(-1, dim)
  table = hash_table.insert(keys)
  if not isinstance(table.num_unique, jax.core.Tracer) and int(table.num_unique) > capacity:
    raise ValueError(f"build_lattice: {int(table.num_unique)} lattice points exceed capacity {capacity}; "
                     f"pass a larger capacity (N*(d+1) = {max_points(num_inputs, dim)} always suffices).")
  neighbors = _find_neighbors(keys, table, capacity)
  return Lattice(offsets=table.entry_id.reshape(num_inputs, dim + 1), weights=simplices.weights,
                 neighbors=neighbors, num_points=table.num_unique, capacities=capacity_ladder(capacity))


def compact(lattice: Lattice) -> Lattice:
  """Shrinks a concrete (not traced) lattice to capacity M exactly: a constant lattice for reuse."""
  num_points = int(lattice.num_points)
  neighbors = np.minimum(np.asarray(lattice.neighbors)[:, :, :num_points + 1], num_points)
  neighbors[:, :, num_points] = num_points
  return Lattice(offsets=lattice.offsets, weights=lattice.weights, neighbors=jnp.asarray(neighbors),
                 num_points=lattice.num_points, capacities=(num_points,))


def _filter_at(lattice: Lattice, values: jnp.ndarray, rung: int, reverse: bool) -> jnp.ndarray:
  """Splat, blur, slice on the first `rung` lattice points. values: [N, L] -> [N, L]."""
  num_inputs, num_values = values.shape
  dim = lattice.offsets.shape[-1] - 1
  neighbors = jnp.minimum(lattice.neighbors[:, :, :rung + 1], rung).at[:, :, rung].set(rung)
  if reverse:
    neighbors = neighbors[::-1]
  contributions = lattice.weights[:, :, None] * values[:, None, :]  # [N, d+1, L]
  grid = jax.ops.segment_sum(contributions.reshape(-1, num_values), lattice.offsets.reshape(-1),
                             num_segments=rung + 1)

  # One scan step per direction: unrolled, XLA would fuse the steps and recompute.
  def blur(grid, pair):
    return grid + 0.5 * (grid[pair[0]] + grid[pair[1]]), None

  grid, _ = jax.lax.scan(blur, grid, neighbors)
  alpha = np.float32(1.0 / (1.0 + 2.0 ** -dim))
  out = jnp.zeros((num_inputs, num_values), jnp.float32)
  for r in range(dim + 1):
    out = out + (lattice.weights[:, r:r + 1] * alpha) * grid[lattice.offsets[:, r]]
  return out


def _filter(lattice: Lattice, values: jnp.ndarray, reverse: bool) -> jnp.ndarray:
  """Runs the filter at the smallest capacity rung that holds the lattice; NaN on overflow."""
  branches = [functools.partial(_filter_at, rung=rung, reverse=reverse) for rung in lattice.capacities]
  if len(branches) == 1:
    out = branches[0](lattice, values)
  else:
    out = jax.lax.switch(_rung(lattice.num_points, lattice.capacities), branches, lattice, values)
  return jnp.where(lattice.num_points <= lattice.capacity, out, jnp.nan)


def _filter_batched(reverse: bool, axis_size: int, in_batched, lattice: Lattice, values: jnp.ndarray):
  """vmap rule: one rung for the whole batch (the largest needed), not every rung per image."""
  lattice_batched, values_batched = in_batched
  if not any(jax.tree_util.tree_leaves(lattice_batched)):
    # One lattice for all: filter the batch as extra value columns.
    stacked = values if values_batched else values[None]
    num_inputs, num_values = stacked.shape[1:]
    columns = jnp.transpose(stacked, (1, 0, 2)).reshape(num_inputs, -1)
    out = _filter(lattice, columns, reverse).reshape(num_inputs, -1, num_values)
    return jnp.transpose(out, (1, 0, 2)), values_batched
  lattice = jax.tree_util.tree_map(
      lambda leaf, batched: leaf if batched else jnp.broadcast_to(leaf, (axis_size,) + leaf.shape),
      lattice, lattice_batched)
  if not values_batched:
    values = jnp.broadcast_to(values, (axis_size,) + values.shape)
  rung = jnp.max(jax.vmap(_rung, in_axes=(0, None))(lattice.num_points, lattice.capacities))
  branches = [jax.vmap(functools.partial(_filter_at, rung=r, reverse=reverse)) for r in lattice.capacities]
  out = jax.lax.switch(rung, branches, lattice, values)
  overflow = (lattice.num_points > lattice.capacity)[:, None, None]
  return jnp.where(overflow, jnp.nan, out), True


def _make_filter(reverse: bool):
  filt = jax.custom_batching.custom_vmap(functools.partial(_filter, reverse=reverse))
  filt.def_vmap(functools.partial(_filter_batched, reverse))
  return filt


_forward_filter = _make_filter(reverse=False)
_reverse_filter = _make_filter(reverse=True)


@jax.custom_vjp
def lattice_filter(lattice: Lattice, values: jnp.ndarray) -> jnp.ndarray:
  """Approximate Gaussian filter out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j, as pydensecrf computes it.

  Jittable, vmappable (a batch runs at one capacity rung, the largest needed)
  and differentiable with respect to values (the transpose filter blurs the
  directions in reverse order, as pydensecrf's compute(..., reverse=true)).

  Args:
    lattice: from build_lattice(features [N, d]).
    values: [N, L] float32.

  Returns:
    [N, L] float32; NaN everywhere if the lattice overflowed its capacity.
  """
  return _forward_filter(lattice, values)


def _lattice_filter_fwd(lattice, values):
  return _forward_filter(lattice, values), lattice


def _lattice_filter_bwd(lattice, cotangent):
  return None, _reverse_filter(lattice, cotangent)


lattice_filter.defvjp(_lattice_filter_fwd, _lattice_filter_bwd)

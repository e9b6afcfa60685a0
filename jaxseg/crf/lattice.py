"""Gaussian filtering with the permutohedral lattice (Adams, Baek & Davis 2010).

Matches Krähenbühl's permutohedral.cpp (inside pydensecrf): splat onto the
vertices of each point's enclosing simplex with barycentric weights, blur with
[1/2, 1, 1/2] along each of the d+1 lattice directions in turn (0..d), slice
back with the same weights and scale by alpha = 1 / (1 + 2^-d).

The number of lattice points M is data dependent while XLA shapes are static.
A lattice is sized for a static capacity C (N*(d+1) by default, which can never
overflow) and carries smaller capacities from the capacity ladder (capacity_ladder);
each filter runs (through lax.switch) at the smallest rung that holds M, and
the neighbour search runs chunk by chunk in a loop whose trip count follows M.
Build once per feature set, then filter any number of value arrays.
Callers that can run a whole computation at one rung (dense_crf does) split
the build: lattice_points (everything M-independent) outside a rung switch
(`on_rung`), lattice_at (neighbours at that rung's capacity) inside it.
"""

import functools
from typing import Callable, NamedTuple, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import hash_table
from jaxseg.crf.simplex import enclosing_simplices

_SEARCH_CHUNK = 8192
_SPLAT_CHUNK = 8192


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


class LatticePoints(NamedTuple):
  """The part of a lattice that does not depend on its capacity.

  offsets, weights: as in Lattice.
  keys: [E, W] int32, E = (d+1) N lattice coordinates (W = d, or d + 1 with a segment word), vertex-major
    (entry r*N + i is vertex r of point i).
  table: hash table of keys; table.num_unique is M.
  """
  offsets: jnp.ndarray
  weights: jnp.ndarray
  keys: jnp.ndarray
  table: hash_table.HashTable


def max_points(num_inputs: int, dim: int) -> int:
  """Static bound on the number of lattice points of N inputs in d dimensions: N*(d+1)."""
  return num_inputs * (dim + 1)


# The one capacity ladder, in lattice points per input point (descending, at most 1.5x apart); N*(d+1) is
# always the top rung. dense_crf switches among a few of them at run time (SWITCHED_RUNGS: every switched
# rung is a branch compiled); the refinement's canvases pick one on the host from counted points.
LADDER_PER_POINT = (4.0, 3.0, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.09375, 0.0625)
SWITCHED_RUNGS = (1.5, 1.0, 0.5, 0.125)


def capacity_ladder(num_inputs: int, dim: int, per_point: Tuple[float, ...] = LADDER_PER_POINT) -> Tuple[int, ...]:
  """Descending static capacities of the lattice of N points in d dimensions: N*(d+1) and N * per_point
  (each of LADDER_PER_POINT, or of a subset of it such as SWITCHED_RUNGS) below it."""
  top = max_points(num_inputs, dim)
  rungs = {max(1, int(np.ceil(num_inputs * f))) for f in per_point}
  return tuple(sorted({top} | {r for r in rungs if r < top}, reverse=True))


def _rung(num_points: jnp.ndarray, capacities: Tuple[int, ...]) -> jnp.ndarray:
  """Index of the smallest capacity >= num_points (0 if none, i.e. overflow)."""
  fits = num_points <= jnp.asarray(capacities, jnp.int32)
  return jnp.maximum(jnp.sum(fits, dtype=jnp.int32) - 1, 0)


def on_rung(capacities: Tuple[int, ...], branch: Callable) -> Callable:
  """Dispatches on the number of lattice points: f(num_points, *operands) = branch(rung, *operands).

  rung is the smallest of `capacities` that holds num_points (static inside
  the branch). Under vmap the whole batch runs one rung, the largest needed:
  a batched index would make lax.switch run every branch.
  """
  def call(num_points, *operands):
    if len(capacities) == 1:
      return branch(capacities[0], *operands)
    branches = [functools.partial(branch, rung) for rung in capacities]
    return jax.lax.switch(_rung(num_points, capacities), branches, *operands)

  dispatch = jax.custom_batching.custom_vmap(call)

  @dispatch.def_vmap
  def _batched(axis_size, in_batched, num_points, *operands):
    del axis_size
    largest = jnp.max(num_points) if in_batched[0] else num_points
    in_axes = jax.tree_util.tree_map(lambda batched: 0 if batched else None, tuple(in_batched[1:]))
    branches = [jax.vmap(functools.partial(branch, rung), in_axes=in_axes) for rung in capacities]
    if len(branches) == 1:
      return branches[0](*operands), True
    return jax.lax.switch(_rung(largest, capacities), branches, *operands), True

  return dispatch


def _plus_steps(dim: int) -> np.ndarray:
  """[d+1, d] int32: key offset of the +1 blur neighbour along each direction (the -1 one is its negation)."""
  steps = np.ones((dim + 1, dim), np.int32)
  steps[np.arange(dim), np.arange(dim)] = -dim
  return steps


def _find_neighbors(keys: jnp.ndarray, table: hash_table.HashTable, capacity: int, dim: int) -> jnp.ndarray:
  """Blur neighbours of every lattice point, searched chunk by chunk so the work follows M.

  Args:
    keys: [E, W] int32, the keys the table was built from: d lattice coordinates, then any segment word.
    table: their hash table.
    capacity: static C.
    dim: static d.

  Returns:
    [d+1, 2, C+1] int32: -1 and +1 neighbours along each direction, C where absent.
  """
  rows = capacity + 1
  chunk = min(_SEARCH_CHUNK, rows)
  steps = np.zeros((dim + 1, keys.shape[1]), np.int32)
  steps[:, :dim] = _plus_steps(dim)  # a neighbour is in the same segment
  steps = jnp.asarray(steps)
  num_points = jnp.minimum(table.num_unique, capacity)

  def search(i, neighbors):
    # The last chunk is moved back to fit; rows it repeats get the same values again.
    start = jnp.minimum(i * chunk, rows - chunk)
    point = start + jnp.arange(chunk, dtype=jnp.int32)
    own = hash_table.take(keys, hash_table.take(table.first_entry, point, "clip"), "clip")
    queries = own[:, None, :] + steps  # [chunk, d+1, W]
    in_use = jnp.broadcast_to((point < num_points)[:, None], queries.shape[:-1])
    hit = hash_table.lookup(table, keys, queries.reshape(-1, keys.shape[1]), in_use.reshape(-1))
    hit = hit.reshape(chunk, dim + 1).T
    hit = jnp.where((hit < 0) | (hit >= capacity), capacity, hit)  # [d+1, chunk]
    neighbors = jax.lax.dynamic_update_slice(neighbors, hit[:, None, :], (0, 1, start))
    # b is a's +1 neighbour exactly when a is b's -1 neighbour; absent ones are dropped.
    minus_rows = jnp.where(hit < capacity, hit, rows)
    return jax.vmap(lambda table_j, h: table_j.at[0, h].set(point, mode="drop", **hash_table.NONNEGATIVE))(
        neighbors, minus_rows)

  num_chunks = (num_points + chunk - 1) // chunk
  return jax.lax.fori_loop(0, num_chunks, search, jnp.full((dim + 1, 2, rows), capacity, jnp.int32))


def lattice_points(features: jnp.ndarray, segment: Optional[jnp.ndarray] = None) -> LatticePoints:
  """Simplices, keys and point ids of a point set: the capacity-independent part of build_lattice.

  Args:
    features: [N, d] float32, as for build_lattice.
    segment: optional [N] int32; points of different segments share no lattice point, so one
      lattice holds several independent point sets (e.g. images packed into one array) and
      filters each as if it were alone.

  Returns:
    LatticePoints.
  """
  num_inputs, dim = features.shape
  simplices = enclosing_simplices(features, segment)
  keys = simplices.keys.reshape((dim + 1) * num_inputs, -1)
  table = hash_table.insert(keys)
  offsets = table.entry_id.reshape(dim + 1, num_inputs).T
  return LatticePoints(offsets=offsets, weights=simplices.weights, keys=keys, table=table)


def lattice_at(points: LatticePoints, capacity: int, capacities: Optional[Tuple[int, ...]] = None) -> Lattice:
  """The lattice of `points` with room for `capacity` points (static); filters use `capacities` (default (C,))."""
  return Lattice(offsets=points.offsets, weights=points.weights,
                 neighbors=_find_neighbors(points.keys, points.table, capacity, points.offsets.shape[1] - 1),
                 num_points=points.table.num_unique, capacities=capacities or (capacity,))


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
  points = lattice_points(features)
  num_points = points.table.num_unique
  if not isinstance(num_points, jax.core.Tracer) and int(num_points) > capacity:
    raise ValueError(f"build_lattice: {int(num_points)} lattice points exceed capacity {capacity}; "
                     f"pass a larger capacity (N*(d+1) = {max_points(num_inputs, dim)} always suffices).")
  rungs = capacity_ladder(num_inputs, dim, SWITCHED_RUNGS)
  return lattice_at(points, capacity, (capacity,) + tuple(r for r in rungs if r < capacity))


def _splat(lattice: Lattice, values: jnp.ndarray, rows: int, scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Segment sums of weighted (scale * values) onto `rows` lattice rows, point by point as the reference adds them.

  Several channels: a chunk of points at a time, so that the [N, d+1, L] contributions never exist whole,
  nor does scale * values. One channel (the two-label filter, the norms): one scatter of all N*(d+1) rows,
  a few MB, without the chunk loop's steps.
  values: [N, L], scale: optional [N, 1] -> [rows, L].
  """
  num_inputs, num_values = values.shape

  def add(grid, start, size):
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size)
    chunk_values = take(values) if scale is None else take(scale) * take(values)
    contributions = take(lattice.weights)[:, :, None] * chunk_values[:, None, :]  # [size, d+1, L]
    return grid.at[take(lattice.offsets).reshape(-1)].add(contributions.reshape(-1, num_values), mode="drop",
                                                          **hash_table.NONNEGATIVE)

  grid = jnp.zeros((rows, num_values), jnp.float32)
  if num_values == 1:
    return add(grid, 0, num_inputs)
  chunk = min(_SPLAT_CHUNK, num_inputs)
  full_chunks, tail = divmod(num_inputs, chunk)
  grid = jax.lax.fori_loop(0, full_chunks, lambda i, grid: add(grid, i * chunk, chunk), grid)
  return add(grid, full_chunks * chunk, tail) if tail else grid


def _filter_at(rung: int, lattice: Lattice, values: jnp.ndarray, scale: Optional[jnp.ndarray] = None, *,
               reverse: bool) -> jnp.ndarray:
  """Splat (of scale * values), blur, slice on the first `rung` lattice points. values: [N, L] -> [N, L]."""
  num_inputs, num_values = values.shape
  dim = lattice.offsets.shape[-1] - 1
  neighbors = lattice.neighbors
  if rung != lattice.capacity:
    neighbors = jnp.minimum(neighbors[:, :, :rung + 1], rung)
  if reverse:
    neighbors = neighbors[::-1]
  grid = _splat(lattice, values, rung + 1, scale)

  # One scan step per direction: unrolled, XLA would fuse the steps and recompute.
  def blur(grid, pair):
    return grid + 0.5 * (hash_table.take(grid, pair[0]) + hash_table.take(grid, pair[1])), None

  grid, _ = jax.lax.scan(blur, grid, neighbors)
  alpha = np.float32(1.0 / (1.0 + 2.0 ** -dim))
  out = jnp.zeros((num_inputs, num_values), jnp.float32)
  if num_values == 1:
    # One gather of all vertices: per vertex, its column of offsets was a loop-invariant kernel of its own.
    # With more channels the [N, d+1, L] gather was no faster (L=21).
    vertex_values = hash_table.take(grid, lattice.offsets)  # [N, d+1, 1]
    vertex = lambda r: vertex_values[:, r]
  else:
    vertex = lambda r: hash_table.take(grid, lattice.offsets[:, r])
  for r in range(dim + 1):
    out = out + (lattice.weights[:, r:r + 1] * alpha) * vertex(r)
  return out


def _make_filter(reverse: bool):
  """Filter at the smallest capacity rung that holds the lattice; NaN on overflow."""
  def filt(lattice: Lattice, values: jnp.ndarray, scale: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    operands = (lattice, values) if scale is None else (lattice, values, scale)
    out = on_rung(lattice.capacities, functools.partial(_filter_at, reverse=reverse))(lattice.num_points, *operands)
    overflow = lattice.num_points > lattice.capacity
    return jnp.where(overflow[..., None, None], jnp.nan, out)
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


@jax.custom_vjp
def scaled_filter(lattice: Lattice, values: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """lattice_filter(lattice, scale * values), bit for bit, without the [N, L] product in memory.

  Args: lattice, values [N, L] float32 as lattice_filter; scale: [N, 1] float32 (e.g. a normalisation).
  Returns: [N, L] float32.
  """
  return _forward_filter(lattice, values, scale)


def _scaled_filter_fwd(lattice, values, scale):
  return _forward_filter(lattice, values, scale), (lattice, values, scale)


def _scaled_filter_bwd(residuals, cotangent):
  lattice, values, scale = residuals
  back = _reverse_filter(lattice, cotangent)
  return None, scale * back, jnp.sum(values * back, axis=-1, keepdims=True)


scaled_filter.defvjp(_scaled_filter_fwd, _scaled_filter_bwd)

"""The position kernel's permutohedral lattice, indexed by arithmetic instead of a hash table.

For 2-D features the lattice points are keys (k0, k1) (k2 = -k0 - k1) whose
coordinates are all congruent mod 3, and (c, b) = (k0 + k1, (k1 - k0) / 3)
numbers them one to one, with c = b (mod 2). Pixel positions map to
c ~ 2 y / sxy and b ~ -1.15 x / sxy, so an image's points fill an axis-aligned
box of cells (c, floor(b / 2)) with few holes. Each segment (image) gets
its own box, one after another; a simplex vertex's cell is arithmetic on its
key, and a blur neighbour is arithmetic on the cell, kept only where some
vertex lies (the hashed lattice has no other points). The lattice then
filters exactly as the hashed one: the same points hold the same sums,
added in the same order. It skips the hash insert and the neighbour search,
the two costliest parts of building the lattice.

Boxes have about 2 / sqrt(3) / sxy^2 cells per pixel, so below MIN_SXY the
hashed lattice (lattice.lattice_points) is the smaller one.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import hash_table
from jaxseg.crf.lattice import Lattice
from jaxseg.crf.simplex import enclosing_simplices

MIN_SXY = 0.8
# (delta c, delta b) of the +1 blur neighbour along directions 0, 1, 2: key steps (-2, 1), (1, -2), (1, 1).
_STEPS = ((-1, 1), (-1, -1), (2, 0))


class GridPoints(NamedTuple):
  """The capacity-independent part of a grid lattice.

  offsets: [N, 3] int32, cell of each simplex vertex of each point (as Lattice.offsets).
  weights: [N, 3] float32, barycentric weights.
  low: [S, 2] int32, each segment's smallest (c, column).
  shape: [S, 2] int32, each segment's box (rows, columns); 0 for an empty segment.
  base: [S] int32, each segment's first cell.
  num_cells: [] int32, cells of all boxes (the capacity needed).
  """
  offsets: jnp.ndarray
  weights: jnp.ndarray
  low: jnp.ndarray
  shape: jnp.ndarray
  base: jnp.ndarray
  num_cells: jnp.ndarray


def _cell(keys: jnp.ndarray):
  """keys [..., 2] int32 -> (c, column) [...] int32."""
  c = keys[..., 0] + keys[..., 1]
  b = (keys[..., 1] - keys[..., 0]) // 3  # exact: the coordinates are congruent mod 3
  return c, b >> 1  # one to one along a row: its b are all of c's parity


def grid_points(features: jnp.ndarray, segment: Optional[jnp.ndarray] = None, num_segments: int = 1) -> GridPoints:
  """Simplices and cells of 2-D features.

  Args:
    features: [N, 2] float32, positions divided by the kernel's standard deviation.
    segment: optional [N] int32 in [0, num_segments): points of different segments share no
      lattice point (lattice.lattice_points' segment).
    num_segments: static.

  Returns:
    GridPoints.
  """
  num_inputs = features.shape[0]
  simplices = enclosing_simplices(features)
  c, col = _cell(simplices.keys)  # [3, N]
  segment = jnp.zeros(num_inputs, jnp.int32) if segment is None else segment.astype(jnp.int32)
  reduce = lambda fn, x: fn(x, segment, num_segments)  # over pixels, of their vertices' extremes: 3x fewer
  c_low, col_low = reduce(jax.ops.segment_min, c.min(0)), reduce(jax.ops.segment_min, col.min(0))
  c_high, col_high = reduce(jax.ops.segment_max, c.max(0)), reduce(jax.ops.segment_max, col.max(0))
  present = c_high >= c_low  # an absent segment keeps the identities: int32 min and max
  rows = jnp.where(present, c_high - c_low + 1, 0)
  cols = jnp.where(present, col_high - col_low + 1, 0)
  sizes = rows * cols
  base = hash_table.running_count(sizes) - sizes  # one small matmul: jnp.cumsum compiled more kernels
  cells = base[segment] + (c - c_low[segment]) * cols[segment] + (col - col_low[segment])
  return GridPoints(offsets=cells.T, weights=simplices.weights, low=jnp.stack([c_low, col_low], -1),
                    shape=jnp.stack([rows, cols], -1), base=base, num_cells=jnp.sum(sizes))


def grid_lattice(points: GridPoints, capacity: int) -> Lattice:
  """The Lattice of `points` with room for `capacity` cells (static); NaN filters if num_cells exceeds it."""
  cell = jnp.arange(capacity, dtype=jnp.int32)
  ends = points.base + points.shape[:, 0] * points.shape[:, 1]
  segment = jnp.minimum(jnp.searchsorted(ends, cell, side="right", method="compare_all"),
                        ends.shape[0] - 1).astype(jnp.int32)
  rows, cols = points.shape[segment, 0], jnp.maximum(points.shape[segment, 1], 1)
  base, c_low, col_low = points.base[segment], points.low[segment, 0], points.low[segment, 1]
  local = cell - base
  row = local // cols
  c = row + c_low
  b = 2 * (local - row * cols + col_low) + (c & 1)
  in_use = cell < points.num_cells
  exists = jnp.zeros(capacity + 1, bool).at[points.offsets.reshape(-1)].set(True, mode="drop")
  exists = exists.at[capacity].set(False)

  def neighbour(delta_c, delta_b):
    c_n, b_n = c + delta_c, b + delta_b
    row_n, col_n = c_n - c_low, (b_n >> 1) - col_low
    inside = in_use & (row_n >= 0) & (row_n < rows) & (col_n >= 0) & (col_n < cols)
    index = jnp.where(inside, base + row_n * cols + col_n, capacity)
    index = jnp.where(exists[index], index, capacity)
    return jnp.append(index, capacity)  # the zero row's neighbours: itself

  neighbors = jnp.stack([jnp.stack([neighbour(-dc, -db), neighbour(dc, db)]) for dc, db in _STEPS])
  return Lattice(offsets=points.offsets, weights=points.weights, neighbors=neighbors,
                 num_points=points.num_cells, capacities=(capacity,))


def grid_capacity(height: int, width: int, sxy: float) -> int:
  """Static bound on the cells of an H x W image's box: (2 (H-1) / sxy + 5) x ((W-1) / sqrt(3) / sxy + 3).

  A simplex's vertices lie within 2 of its point in every key coordinate, so c spans at most
  2 (H-1) / sxy + 4 and b at most 2 (W-1) / sqrt(3) / sxy + 8/3 (measured: 4 and 2 cells of margin left).
  """
  return int(np.ceil((2.0 * (height - 1) / sxy + 5.0) * ((width - 1) / np.sqrt(3.0) / sxy + 3.0)))

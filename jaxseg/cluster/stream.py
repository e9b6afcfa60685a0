"""k-means at dataset scale in bounded memory: a reservoir sample of a stream, then chunked assignment.

    state = reservoir_sample(chunks(), budget=1_000_000, key=key)
    result = reservoir_kmeans(state, k, key=key2)
    for labels in assign_chunks(chunks(), result.centroids): ...

Peak memory depends on the budget and the chunk size, not on the number of points.
Points given stable ids (`ids=`, e.g. image index * patches + patch) get priorities that depend on
(key, id) alone, so the sample, ordered by `reservoir_sorted`, does not depend on how the stream is batched.
A chunk is an [B, D] array or a (x [B, D], mask [B] bool) pair. Chunks shorter
than the first are padded to its size (and the padding masked), so each
function compiles once.
"""

import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseg.cluster.lloyd import KMeansResult
from jaxseg.cluster.lloyd import assign
from jaxseg.cluster.lloyd import kmeans

Chunk = jax.Array | tuple[jax.Array, jax.Array]


class ReservoirState(NamedTuple):
  """A uniform sample without replacement of the valid points streamed so far.

  Every valid point gets a random priority; the sample is the `budget`
  points of highest priority (bottom-k sampling), which is uniform over all
  points seen however they were batched. The order of the rows depends on
  the batching: `reservoir_sorted` puts them in priority order.

  Attributes:
    points: [budget, D] float32 sampled points (zeros in unfilled slots).
    priorities: [budget] uint32, 0 marks an unfilled slot.
    n_seen: [] uint32 number of valid points streamed so far.
  """
  points: jax.Array
  priorities: jax.Array
  n_seen: jax.Array

  @property
  def mask(self) -> jax.Array:
    """[budget] bool, True for filled slots."""
    return self.priorities > 0


def reservoir_init(budget: int, dim: int) -> ReservoirState:
  """An empty reservoir holding up to `budget` points of `dim` features."""
  if budget < 1 or dim < 1:
    raise ValueError(f"reservoir_init: budget and dim must be >= 1, got {budget}, {dim}.")
  return ReservoirState(jnp.zeros((budget, dim), jnp.float32), jnp.zeros(budget, jnp.uint32),
                        jnp.zeros((), jnp.uint32))


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that scatters nearby ids."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def id_priorities(key: jax.Array, ids: jax.Array) -> jax.Array:
  """[B] uint32 priorities of points with ids [B] (integers < 2**32): a keyed bijection of the id.

  Distinct ids get distinct priorities, so the sample and its priority order have no ties; the one id
  that maps to 0 ("empty slot") is never sampled, for any batching.
  """
  scale, shift, flip = jax.random.bits(key, (3,), jnp.uint32)
  return _mix32(_mix32(ids.astype(jnp.uint32) * (scale | 1) + shift) ^ flip)


def _reservoir_add(state: ReservoirState, x: jax.Array, *, key: jax.Array,
                   mask: jax.Array | None = None, ids: jax.Array | None = None) -> ReservoirState:
  """Streams a batch through the reservoir.

  Args:
    state: the reservoir so far.
    x: [B, D] new points.
    key: PRNG key: with ids, the same for every batch; without, a different one for every batch.
    mask: [B] bool, False = padding (never sampled, not counted).
    ids: [B] int, each point's stable id (unique over the stream): its priority is id_priorities(key, id),
      so the same points are sampled however the stream is batched. None: random priorities per batch.

  Returns:
    The reservoir over everything seen, still of size budget.
  """
  budget, dim = state.points.shape
  if x.ndim != 2 or x.shape[1] != dim:
    raise ValueError(f"reservoir_add: x must be [B, {dim}], got shape {x.shape}.")
  valid = jnp.ones(x.shape[0], bool) if mask is None else mask.astype(bool)
  if valid.shape != x.shape[:1]:
    raise ValueError(f"reservoir_add: mask must be [B] = {x.shape[:1]}, got shape {valid.shape}.")
  if ids is None:  # odd priorities for valid points so that 0 can mean "nothing here"
    new_priorities = jnp.where(valid, jax.random.bits(key, x.shape[:1], jnp.uint32) | 1, 0)
  elif ids.shape != x.shape[:1]:
    raise ValueError(f"reservoir_add: ids must be [B] = {x.shape[:1]}, got shape {ids.shape}.")
  else:
    new_priorities = jnp.where(valid, id_priorities(key, ids), 0)
  # Merge: the j-th highest new priority replaces the j-th lowest slot while it is higher, which
  # keeps exactly the `budget` highest of both and writes at most B rows.
  n_merge = min(x.shape[0], budget)
  batch_priorities, batch_index = jax.lax.top_k(new_priorities, n_merge)
  inverted, slot_index = jax.lax.top_k(~state.priorities, n_merge)
  slot_priorities = ~inverted
  enters = batch_priorities > slot_priorities
  rows = jnp.where(enters[:, None], x[batch_index].astype(jnp.float32), state.points[slot_index])
  points = state.points.at[slot_index].set(rows, unique_indices=True)
  priorities = state.priorities.at[slot_index].set(jnp.where(enters, batch_priorities, slot_priorities),
                                                   unique_indices=True)
  return ReservoirState(points, priorities, state.n_seen + jnp.sum(valid, dtype=jnp.uint32))


reservoir_add = jax.jit(_reservoir_add)
reservoir_add_donated = jax.jit(_reservoir_add, donate_argnames="state")
reservoir_add_donated.__doc__ = """`reservoir_add` that reuses the buffers of the state passed in (about 3x faster on
a large reservoir, no second copy in memory). That state is deleted: use only the returned one."""


@jax.jit
def reservoir_sorted(state: ReservoirState) -> ReservoirState:
  """The same sample with its rows in decreasing priority (unfilled slots last): with `ids`, this order
  depends on the points alone, so whatever is fitted on the sample does not depend on the batching."""
  order = jnp.argsort(state.priorities, descending=True, stable=True)
  return ReservoirState(state.points[order], state.priorities[order], state.n_seen)


def _padded_chunks(chunks: Iterable[Chunk]) -> Iterator[tuple[jax.Array, jax.Array, int]]:
  """Yields (x [B, D], mask [B], n_rows) with every chunk padded to the first chunk's B."""
  size = None
  for i, chunk in enumerate(chunks):
    x, mask = chunk if isinstance(chunk, tuple) else (chunk, None)
    x = jnp.asarray(x)
    if x.ndim != 2:
      raise ValueError(f"chunk {i}: x must be [B, D], got shape {x.shape}.")
    n = x.shape[0]
    mask = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    if mask.shape != (n,):
      raise ValueError(f"chunk {i}: mask must be [B] = ({n},), got shape {mask.shape}.")
    size = n if size is None else size
    if n < size:
      x = jnp.pad(x, ((0, size - n), (0, 0)))
      mask = jnp.pad(mask, (0, size - n))
    yield x, mask, n


def reservoir_sample(chunks: Iterable[Chunk], budget: int, *, key: jax.Array,
                     state: ReservoirState | None = None) -> ReservoirState:
  """Uniform sample without replacement of at most `budget` valid points from a stream of chunks.

  Args:
    chunks: iterable of [B, D] arrays or (x, mask) pairs, consumed once.
    budget: sample size.
    key: PRNG key; chunk i uses fold_in(key, i).
    state: a reservoir to continue (consumed: use the returned one); None starts an empty one of dim D.

  Returns:
    The reservoir after the whole stream.
  """
  for i, (x, mask, _) in enumerate(_padded_chunks(chunks)):
    if state is None:
      state = reservoir_init(budget, x.shape[1])
    # Waiting for the previous batch keeps at most two chunks alive, whatever the stream's length.
    state = reservoir_add_donated(jax.block_until_ready(state), x, key=jax.random.fold_in(key, i), mask=mask)
  if state is None:
    raise ValueError("reservoir_sample: the stream of chunks is empty.")
  return state


def reservoir_kmeans(state: ReservoirState, k: int, *, key: jax.Array, **kmeans_kwargs) -> KMeansResult:
  """`kmeans` on the sampled points; unfilled slots are masked (label -1).

  kmeans_kwargs: n_init, max_iter, tol, metric, init as for `kmeans`.
  """
  return kmeans(state.points, k, key=key, mask=state.mask, **kmeans_kwargs)


_assign = jax.jit(assign, static_argnames="metric")


def assign_chunks(chunks: Iterable[Chunk], centroids: jax.Array,
                  metric: str = "euclidean") -> Iterator[jax.Array]:
  """Yields [B] int32 labels (nearest centroid, -1 where masked) for every chunk of a stream, in order."""
  for x, mask, n in _padded_chunks(chunks):
    # Ready before the next chunk is read, so that chunks do not pile up behind async dispatch.
    yield jax.block_until_ready(_assign(x, centroids, metric, mask=mask)[:n])

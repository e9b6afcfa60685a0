"""A static-size open-addressing hash table of integer keys, built with scatters.

Sorting a million multi-word keys is slow in XLA on CPU; inserting them into a
linear-probing table in parallel rounds (each round: claim empty slots with a
scatter-min, keep the entries whose key won their slot, move the others one
slot on) is much faster and runs the same on CPU and GPU. After the first
round only a few entries still collide; later rounds run on those alone.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_FNV_OFFSET = np.uint32(2166136261)
_FNV_PRIME = np.uint32(16777619)
_GOLDEN = np.uint32(0x9E3779B1)


class HashTable(NamedTuple):
  """Unique keys with dense ids in order of first occurrence (as a sequential insert would give).

  owner: [T] int32, for each slot the first entry whose key lives there, or E when empty.
  entry_id: [E] int32, dense id (0..num_unique-1) of each entry's key.
  first_entry: [E] int32, for each id the first entry with that key (0 past num_unique).
  num_unique: [] int32.
  """
  owner: jnp.ndarray
  entry_id: jnp.ndarray
  first_entry: jnp.ndarray
  num_unique: jnp.ndarray


# Every index into the table, the keys and the lattice is non-negative: without jnp's wrap-around of negative
# indices (a select per index, which XLA hoists out of loops as a kernel of its own to compile).
NONNEGATIVE = dict(wrap_negative_indices=False)


def take(x: jnp.ndarray, index: jnp.ndarray, mode: str = "promise_in_bounds", **kwargs) -> jnp.ndarray:
  """x[index] for a non-negative index (mode as jnp's .at[].get; XLA clamps out-of-range gathers)."""
  return x.at[index].get(mode=mode, **kwargs, **NONNEGATIVE)


def table_size(num_entries: int) -> int:
  """Power of two at least twice the number of entries: load factor <= 1/2."""
  return 1 << max(4, int(np.ceil(np.log2(2 * num_entries + 1))))


def _home_slot(keys: jnp.ndarray, log2_size: int) -> jnp.ndarray:
  """FNV-1a over the key's words, then Fibonacci hashing into 2^log2_size slots. keys: [..., W] int32."""
  h = jnp.full(keys.shape[:-1], _FNV_OFFSET, jnp.uint32)
  for i in range(keys.shape[-1]):
    h = (h ^ keys[..., i].astype(jnp.uint32)) * _FNV_PRIME
  return ((h * _GOLDEN) >> np.uint32(32 - log2_size)).astype(jnp.int32)


# XLA's cumsum on CPU is a tree of reduce-windows, each level a kernel to run and compile; in blocks of this
# many, a [B, B] triangular matmul per block, then the same on the block totals (down to one small matmul),
# is quicker to run and to compile.
_COUNT_BLOCK = 32


def _triangular_ones(size: int) -> jnp.ndarray:
  return jnp.asarray(np.triu(np.ones((size, size), np.int32)))


def running_count(flags: jnp.ndarray) -> jnp.ndarray:
  """Inclusive running count of flags [E] bool, or running sum of int32 counts (jnp.cumsum): [E] int32."""
  values = flags.astype(jnp.int32)
  num = values.shape[0]
  if num <= 4 * _COUNT_BLOCK:
    return values @ _triangular_ones(num)
  padded = -(-num // _COUNT_BLOCK) * _COUNT_BLOCK
  within = jnp.pad(values, (0, padded - num)).reshape(-1, _COUNT_BLOCK) @ _triangular_ones(_COUNT_BLOCK)
  totals = within[:, -1]
  return (within + (running_count(totals) - totals)[:, None]).reshape(-1)[:num]


def _first_flagged(flags: jnp.ndarray, size: int, fill_value: int) -> jnp.ndarray:
  """jnp.nonzero(flags, size=size, fill_value=fill_value)[0]: the first `size` flagged indices. [size] int32."""
  place = jnp.where(flags, running_count(flags) - 1, size)
  return jnp.full((size,), fill_value, jnp.int32).at[place].set(
      jnp.arange(flags.shape[0], dtype=jnp.int32), mode="drop", **NONNEGATIVE)


def insert(keys: jnp.ndarray) -> HashTable:
  """Gives every distinct key a dense id.

  Args:
    keys: [E, W] int32.

  Returns:
    HashTable of size table_size(E).
  """
  num_entries = keys.shape[0]
  size = table_size(num_entries)
  log2_size = size.bit_length() - 1

  def unfinished(state):
    return ~jnp.all(state[3])

  def probe(state):
    """One linear-probing step for the lanes (entry ids) not yet done."""
    owner, entry, slot, done = state
    empty = take(owner, slot) == num_entries
    claim = jnp.where(done | ~empty, size, slot)
    owner = owner.at[claim].min(entry, mode="drop", **NONNEGATIVE)
    winner = take(owner, slot)
    lane_keys = take(keys, entry, "clip")
    done = done | jnp.all(take(keys, winner, "clip") == lane_keys, axis=-1)
    slot = jnp.where(done, slot, (slot + 1) & (size - 1))
    return owner, entry, slot, done

  entry = jnp.arange(num_entries, dtype=jnp.int32)
  owner = jnp.full((size,), num_entries, jnp.int32)
  done = jnp.zeros((num_entries,), bool)
  owner, _, slot, done = probe((owner, entry, _home_slot(keys, log2_size), done))
  # Few entries collide after the first step: keep probing on a small compacted set of lanes, again
  # while any lane did not fit (usually never). One loop body: each copy of probe compiled for ~0.2 s.
  budget = max(1, num_entries // 16)

  def compacted_round(state):
    owner, slot, done = state
    pending = _first_flagged(~done, budget, num_entries)
    sub_state = (owner, pending, take(slot, pending, "fill", fill_value=0), pending >= num_entries)
    owner, _, sub_slot, _ = jax.lax.while_loop(unfinished, probe, sub_state)
    return (owner, slot.at[pending].set(sub_slot, mode="drop", **NONNEGATIVE),
            done.at[pending].set(True, mode="drop", **NONNEGATIVE))

  owner, slot, _ = jax.lax.while_loop(lambda state: ~jnp.all(state[2]), compacted_round, (owner, slot, done))
  # Scatter-min made each slot's owner its key's first entry; number keys in that order.
  first_of_key = take(owner, slot)
  is_first = first_of_key == entry
  first_id = running_count(is_first) - 1
  first_entry = jnp.zeros((num_entries,), jnp.int32).at[
      jnp.where(is_first, first_id, num_entries)].set(entry, mode="drop", **NONNEGATIVE)
  return HashTable(owner=owner, entry_id=take(first_id, first_of_key), first_entry=first_entry,
                   num_unique=first_id[-1] + 1)  # the last running count: no second pass over E


def lookup(table: HashTable, keys: jnp.ndarray, queries: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Dense ids of query keys.

  Args:
    table: from insert(keys).
    keys: [E, W] int32, the keys the table was built from.
    queries: [Q, W] int32.
    valid: [Q] bool; invalid queries are not looked up.

  Returns:
    [Q] int32: the id of each query's key, or -1 where it is absent or invalid.
  """
  num_entries = keys.shape[0]
  size = table.owner.shape[0]
  log2_size = size.bit_length() - 1

  def unfinished(state):
    return ~jnp.all(state[1])

  def probe(state):
    slot, done, found = state
    current = take(table.owner, slot)
    empty = current == num_entries
    match = ~empty & jnp.all(take(keys, current, "clip") == queries, axis=-1)
    found = jnp.where(~done & match, take(table.entry_id, jnp.minimum(current, num_entries - 1)), found)
    done = done | empty | match
    slot = jnp.where(done, slot, (slot + 1) & (size - 1))
    return slot, done, found

  found = jnp.full(queries.shape[:1], -1, jnp.int32)
  _, _, found = jax.lax.while_loop(unfinished, probe, (_home_slot(queries, log2_size), ~valid, found))
  return found

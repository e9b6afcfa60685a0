"""Data parallelism over a 1-D device mesh: batch-leading arrays sharded on axis "batch", the rest replicated.

    mesh = batch_mesh()                                   # every device, or batch_mesh(jax.local_devices())
    params = replicate(params, mesh)
    batch = pad_batch(batch, mesh.size)                   # padding rows are zeros / False
    out = jitted_fn(params, *shard_batch(batch, mesh))    # GSPMD runs it data-parallel, reducing sums
    host = to_host(out)                                   # numpy, gathered from every process

One device is the same code path (a mesh of size 1). With several processes,
each passes its own rows to `shard_batch` and `to_host` returns the rows of all
processes, in process order.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "batch" over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("batch_mesh: no devices given.")
  return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays whose leading axis is split over the mesh."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of arrays held whole on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
  """Copies every array of a pytree (e.g. ViT params, centroids) to every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def padded_size(size: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= size."""
  if size < 0 or multiple < 1:
    raise ValueError(f"padded_size: size must be >= 0 and multiple >= 1, got {size}, {multiple}.")
  return -(-size // multiple) * multiple


def pad_batch(tree, multiple: int):
  """Pads the leading axis of every array of a pytree to a multiple of `multiple`.

  Padding rows are zeros (False for bool), which is how jaxseg marks padded
  images (valid all False). numpy arrays stay numpy (host batches are padded
  before they are sharded); jax arrays are padded with jnp.

  Args:
    tree: arrays [B, ...] with one B.
    multiple: e.g. the number of devices of the mesh.

  Returns:
    The tree with arrays [padded_size(B, multiple), ...]; unchanged when B already divides.
  """
  leaves = jax.tree.leaves(tree)
  sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"pad_batch: every array needs the same leading axis, got leading sizes {sorted(map(str, sizes))}.")
  size = sizes.pop()
  pad = padded_size(size, multiple) - size

  def pad_one(a):
    xp = np if isinstance(a, np.ndarray) else jnp
    return xp.pad(a, [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1)) if pad else a
  return jax.tree.map(pad_one, tree)


def shard_batch(tree, mesh: Mesh):
  """Places this process's rows of every array [B_local, ...] of a pytree on the mesh, split on axis 0.

  B_local must divide by the mesh's devices of this process (see `pad_batch`);
  the global arrays are [B_local * process count, ...], rows in process order.
  """
  sharding = batch_sharding(mesh)
  local = len(mesh.local_devices)
  for a in jax.tree.leaves(tree):
    if np.ndim(a) == 0 or np.shape(a)[0] % local:
      raise ValueError(f"shard_batch: leading axis of shape {np.shape(a)} must divide by the {local} local "
                       "devices of the mesh; pad it with pad_batch first.")
  if not mesh.is_multi_process:  # arrays already on a device move device to device
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def to_host(tree):
  """numpy copies of every array of a pytree; arrays split over processes are gathered whole on each."""
  def fetch(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(fetch, tree)

"""The two compiled programs of refinement, over a batch of canvases (refine_pack) sharded over a mesh.

  prepare  each canvas's unary and the lattice points of both CRF kernels, with
           their point counts (capacity-independent);
  crf      the mean field at one static (Gaussian, bilateral) capacity, the
           argmax, and whether every marginal came out finite.

Pure functions with static arguments: framework.Refiner chooses the capacities
and keeps track of the programs it runs.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxseg import parallel
from jaxseg.crf import hash_table
from jaxseg.crf import inference
from jaxseg.framework.config import CRFParams
from jaxseg.framework.refine_resize import unary_from_prob


class Layout(NamedTuple):
  """Where each pixel of a canvas lies: slot [N] (its image, 0 past the last), (x, y) in that image, and
  valid [N] (False on padding)."""
  slot: jax.Array
  x: jax.Array
  y: jax.Array
  valid: jax.Array


def layout(sizes: jax.Array, num_pixels: int) -> Layout:
  """Images of sizes [S, 2] (H, W; zeros for empty slots) packed row-major one after the other into N pixels."""
  areas = sizes[:, 0] * sizes[:, 1]
  ends = hash_table.running_count(areas)
  index = jnp.arange(num_pixels, dtype=jnp.int32)
  slot = jnp.searchsorted(ends, index, side="right", method="compare_all").astype(jnp.int32)
  valid = slot < sizes.shape[0]
  slot = jnp.where(valid, slot, 0)
  local = index - (ends - areas)[slot]
  width = jnp.maximum(sizes[slot, 1], 1)
  return Layout(slot, local % width, local // width, valid)


def _kernel_sigmas(params: CRFParams) -> dict:
  return dict(gaussian_sxy=params.gaussian_sxy, bilateral_sxy=params.bilateral_sxy,
              bilateral_srgb=params.bilateral_srgb)


def _prepare_canvas(pixels, sizes, prob, *, params: CRFParams):
  """pixels [N, 3] uint8, sizes [S, 2], prob [N] float32 -> energies [N, 2], KernelPoints, num_points [2]."""
  where = layout(sizes, pixels.shape[0])
  position = jnp.stack([where.x, where.y], axis=-1).astype(jnp.float32)
  points = inference.kernel_points(pixels, where.valid, position, segment=where.slot, num_segments=sizes.shape[0],
                                   **_kernel_sigmas(params))
  num_points = jnp.stack([inference.num_points(points.gaussian), inference.num_points(points.bilateral)])
  return unary_from_prob(prob), points, num_points


def _crf_canvas(points, sizes, energies, *, params: CRFParams, capacities: tuple[int, int]):
  """-> mask [N] bool (argmax, ties to background; False on padding), finite [] bool (every valid marginal)."""
  valid = layout(sizes, energies.shape[0]).valid
  q = inference.crf_marginals(points, energies, valid, iterations=params.iterations,
                              gaussian_weight=params.gaussian_weight, bilateral_weight=params.bilateral_weight,
                              gaussian_capacity=capacities[0], bilateral_capacities=(capacities[1],))
  finite = jnp.all(jnp.isfinite(q) | ~valid[:, None])
  return (q[:, 1] > q[:, 0]) & valid, finite


def _per_canvas(fn, mesh: jax.sharding.Mesh):
  """fn(*row) over the leading axis of batched arguments, each device running its rows one by one.

  The second argument of every row is its sizes [S, 2]; rows with no image
  (batch padding) are skipped and give zeros. A sequential map compiles the
  canvas's program once, where vmap compiled the lattice's loops more slowly.
  """
  fn = jax.jit(fn)

  def one(row):
    empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *row))
    return jax.lax.cond(jnp.any(row[1][:, 0] * row[1][:, 1] > 0), lambda row: fn(*row), lambda row: empty, row)

  spec = jax.sharding.PartitionSpec(parallel.AXIS)
  return jax.shard_map(lambda *args: jax.lax.map(one, args), mesh=mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)


@functools.partial(jax.jit, static_argnames=("params", "mesh"))
def prepare(pixels, sizes, prob, *, params: CRFParams, mesh: jax.sharding.Mesh):
  """pixels [B, N, 3] uint8, sizes [B, S, 2] int32, prob [B, N] float32 ->
  energies [B, N, 2], KernelPoints (batched), num_points [B, 2] (Gaussian, bilateral)."""
  return _per_canvas(functools.partial(_prepare_canvas, params=params), mesh)(pixels, sizes, prob)


@functools.partial(jax.jit, static_argnames=("params", "mesh", "capacities"))
def crf(points, sizes, energies, *, params: CRFParams, mesh: jax.sharding.Mesh, capacities: tuple[int, int]):
  """Batched _crf_canvas at static (Gaussian, bilateral) capacities: -> mask [B, N] bool, finite [B] bool."""
  return _per_canvas(functools.partial(_crf_canvas, params=params, capacities=capacities), mesh)(
      points, sizes, energies)

"""Stage 5: upsample the patch probability to the image's own resolution and refine it with a dense CRF.

A split of many image sizes runs in a few compiled programs. Each image is
flattened (the CRF needs only row-major pixels: x = i % W, y = i // W from a
traced W) and padded to a bucket of PIXEL_BUCKETS pixels with a validity mask;
the images of a bucket are refined together (lax.map on each device: vmap
compiled the lattice 2-3x slower) and sharded over the
mesh. Per bucket, two programs:

  _prepare    upsampling of the level scores and the fused probability to the
              traced (H, W) (gathers; equal to jax.image.resize "linear"
              when upsampling), the 0.5 thresholds, per-level foreground
              pixels and intersection/union against the truth, the unary, and
              the lattice points of both CRF kernels with their point counts;
  _crf_pass   the mean field at one bilateral capacity rung and one Gaussian
              capacity, both chosen on the host from those counts (see
              bilateral_rungs, bucket_gaussian_capacity; an image whose own
              rung is not compiled yet runs at a compiled one a step larger,
              see _reuse_rung), then the argmax and its counts.

Compilations over a whole split are therefore bounded by buckets x (1 +
rungs + 1) (the last: the rare bucket whose Gaussian lattice outgrows its
default capacity), whatever the number of distinct sizes; refine_programs()
reads the count off the jitted functions' caches. Nothing per size is kept.

Images the gathers cannot take run one by one at their own size (one
compilation per size): those larger than crf.max_side (refined at a
downscaled copy, the mask scaled back by nearest) and those smaller than the
patch grid along a side (resizing down is antialiased by jax.image.resize).
"""

import bisect
import functools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import metrics
from jaxseg import parallel
from jaxseg.crf import dense_crf
from jaxseg.crf import inference
from jaxseg.framework.config import CRFConfig

UNARY_EPS = 1e-5  # keeps -log finite; as pydensecrf's unary_from_softmax clips
FG_LEVELS = ("dataset", "category", "image", "fused", "refined")
IGNORE = 255

# Pixel-count buckets: powers of two from 4096 to 2^22 (a 2048 x 2048 image). Padding costs at most 2x
# (VOC's 500 x 375 = 187,500 pads to 262,144, +40%), and a VOC split (sides 180-500) meets 4 buckets,
# COCO (<= 640) 5: each bucket compiles its programs once, and compiling is most of a split's cost.
PIXEL_BUCKETS = tuple(4096 << k for k in range(11))
# Bilateral capacity rungs as fractions of the bucket, a factor 2 apart: the blur follows the rung, the
# compile count the rungs met. Photos need 0.1-1.35 points per pixel at VOC's parameters, i.e. 1-2
# rungs per bucket; 6 (= d+1) can never overflow.
_BILATERAL_RUNG_FRACTIONS = (6.0, 1.5, 0.75, 0.375, 0.1875, 0.09375)
# The Gaussian lattice of a W x H grid has 2 / sqrt(3) points per unit area plus a perimeter term
# (inference.gaussian_capacity); the default capacity of a bucket allows aspect ratios up to 4:1.
_BUCKET_ASPECT = 4.0


class RefineItem(NamedTuple):
  """One image to refine.

  key: opaque, handed back with the result.
  image: [H, W, 3] uint8 at the original resolution.
  fg_prob: [h, w] float fused foreground probability on the patch grid.
  level_scores: [3, h, w] float soft scores of the dataset, category and image levels.
  truth: [H, W] uint8 label map (0 = background, 255 = ignore) or None.
  """
  key: Any
  image: np.ndarray
  fg_prob: np.ndarray
  level_scores: np.ndarray
  truth: np.ndarray | None


class RefinedImage(NamedTuple):
  """Refinement of one image.

  mask: [H, W] bool refined foreground.
  fg_pixels: [5] int64 foreground pixels of each FG_LEVELS mask at (H, W).
  counts: [5, 2] int64 (intersection, union) of each level's foreground vs truth > 0, ignore pixels
    excluded; zeros when truth is None.
  """
  mask: np.ndarray
  fg_pixels: np.ndarray
  counts: np.ndarray


def upsample(prob: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear upsampling of a patch-grid map to (H, W).

  The ViT saw the whole image resized to S x S, so the h x w grid spans the
  whole original image; patch centres sit at half-pixel offsets (no corner
  alignment), as jax.image.resize assumes.

  Args:
    prob: [h, w] float.
    size: (H, W).

  Returns:
    [H, W] float32.
  """
  return jax.image.resize(jnp.asarray(prob, jnp.float32), tuple(size), method="linear")


def _axis_taps(out_index: jax.Array, out_size: jax.Array, in_size: int):
  """Linear-interpolation taps along one axis, half-pixel centres, clamped at the edges (upsampling)."""
  position = (out_index.astype(jnp.float32) + 0.5) * (np.float32(in_size) / out_size.astype(jnp.float32)) - 0.5
  low = jnp.floor(position)
  frac = position - low
  low = low.astype(jnp.int32)
  return jnp.clip(low, 0, in_size - 1), jnp.clip(low + 1, 0, in_size - 1), frac


def upsample_flat(grids: jax.Array, size: jax.Array, num_pixels: int) -> jax.Array:
  """Bilinear upsampling to a traced (H, W), row-major and flat: upsample(grid, (H, W)).ravel() padded.

  Equals jax.image.resize(..., "linear") when H >= h and W >= w (up to float
  rounding); pixels past H * W are meaningless.

  Args:
    grids: [K, h, w] float.
    size: [2] int32 (H, W), traced.
    num_pixels: static N >= H * W.

  Returns:
    [K, N] float32.
  """
  grids = jnp.asarray(grids, jnp.float32)
  height, width = jnp.maximum(size[0], 1), jnp.maximum(size[1], 1)
  index = jnp.arange(num_pixels, dtype=jnp.int32)
  top, bottom, fy = _axis_taps(index // width, height, grids.shape[1])
  left, right, fx = _axis_taps(index % width, width, grids.shape[2])
  upper = grids[:, top, left] * (1 - fx) + grids[:, top, right] * fx
  lower = grids[:, bottom, left] * (1 - fx) + grids[:, bottom, right] * fx
  return upper * (1 - fy) + lower * fy


def unary_from_prob(fg_prob: jax.Array) -> jax.Array:
  """[..., 2] float32 CRF unary (negative log probability) of (background, foreground) from fg_prob: [...]."""
  p = jnp.clip(jnp.asarray(fg_prob, jnp.float32), UNARY_EPS, 1.0 - UNARY_EPS)
  return -jnp.log(jnp.stack([1.0 - p, p], axis=-1))


def downscaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
  """(H, W) scaled so that the longer side is at most max_side (unchanged if it already is, or max_side is 0)."""
  height, width = size
  if not max_side or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def nearest_resize(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[H, W] nearest-neighbour resize of mask [h, w] (pixel centres, no corner alignment)."""
  rows = jnp.minimum(((jnp.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(jnp.int32), mask.shape[0] - 1)
  cols = jnp.minimum(((jnp.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(jnp.int32), mask.shape[1] - 1)
  return mask[rows[:, None], cols[None, :]]


def pixel_bucket(num_pixels: int) -> int | None:
  """The smallest of PIXEL_BUCKETS >= num_pixels, or None past the largest."""
  i = bisect.bisect_left(PIXEL_BUCKETS, num_pixels)
  return PIXEL_BUCKETS[i] if i < len(PIXEL_BUCKETS) else None


def bilateral_rungs(bucket: int) -> tuple[int, ...]:
  """Descending static bilateral capacities of a bucket of `bucket` pixels."""
  return tuple(sorted({int(np.ceil(bucket * f)) for f in _BILATERAL_RUNG_FRACTIONS}, reverse=True))


def bucket_gaussian_capacity(bucket: int, sxy: float) -> int:
  """Default Gaussian capacity of a bucket: the bound of an image of `bucket` pixels with aspect ratio 4:1."""
  short = int(np.ceil(np.sqrt(bucket / _BUCKET_ASPECT)))
  return inference.gaussian_capacity(short, int(np.ceil(bucket / short)), sxy)


# Bilateral rungs each (bucket, CRF, mesh, Gaussian capacity) has run at in this process: small ints
# (no arrays), so that an image may run at an already compiled rung one step above its own.
_RUNGS_RUN: dict[tuple, set[int]] = {}


def _reuse_rung(program: tuple, rungs: tuple[int, ...], num_points: int) -> int:
  """The bilateral capacity to run `num_points` points at: the smallest rung that holds them, or the next
  larger one when only that has been compiled for `program` (a step costs ~15% of a warm CRF, a compile
  ~10 warm CRFs). The result does not depend on the choice: absent points are zero rows."""
  fitting = [r for r in sorted(rungs) if r >= num_points] or [rungs[0]]
  run = _RUNGS_RUN.setdefault(program, set())
  chosen = fitting[1] if fitting[0] not in run and len(fitting) > 1 and fitting[1] in run else fitting[0]
  run.add(chosen)
  return chosen


def _fg_counts(masks: jax.Array, truth: jax.Array, valid: jax.Array):
  """masks [K, N] bool, truth [N] uint8 (IGNORE where absent), valid [N] -> fg [K] int32, counts [K, 2] int32."""
  masks = masks & valid
  counts = jax.vmap(metrics.foreground_counts, in_axes=(0, None, None))(masks, truth, IGNORE)
  return jnp.sum(masks, axis=-1, dtype=jnp.int32), counts


def _crf_params(crf: CRFConfig) -> dict:
  return dict(gaussian_sxy=crf.gaussian_sxy, bilateral_sxy=crf.bilateral_sxy, bilateral_srgb=crf.bilateral_srgb)


def _prepare_one(pixels, size, grids, truth, *, crf: CRFConfig):
  """One flat image: level masks and their counts, the unary, the kernels' lattice points."""
  num_pixels = pixels.shape[0]
  valid = jnp.arange(num_pixels) < size[0] * size[1]
  probs = upsample_flat(grids, size, num_pixels)  # [4, N]: dataset, category, image, fused
  fg, counts = _fg_counts(probs > 0.5, truth, valid)
  out = dict(fg=fg, counts=counts, fused=(probs[3] > 0.5) & valid)
  if crf.iterations:
    out["energies"] = unary_from_prob(probs[3])
    out["points"] = inference.kernel_points(pixels, valid, size[1], **_crf_params(crf))
    out["num_points"] = jnp.stack([out["points"].gaussian.table.num_unique,
                                   out["points"].bilateral.table.num_unique])
  return out


def _per_image(fn, mesh: jax.sharding.Mesh):
  """fn(*row) over the leading axis of batched arguments; each device runs its rows one by one (lax.map).

  The second argument of every row is its size [2] (H, W); rows of size 0
  (batch padding) are skipped and give zeros. A sequential map compiles the
  image's program once; vmapped, the lattice's while loops and scatters
  compiled 2-3x slower, and compiling is most of a split's refinement.
  """
  def one(row):
    empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *row))
    return jax.lax.cond(row[1][0] * row[1][1] > 0, lambda row: fn(*row), lambda row: empty, row)

  spec = jax.sharding.PartitionSpec(parallel.AXIS)
  return jax.shard_map(lambda *args: jax.lax.map(one, args), mesh=mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)


@functools.partial(jax.jit, static_argnames=("crf", "mesh"))
def _prepare(pixels, size, grids, truth, *, crf: CRFConfig, mesh: jax.sharding.Mesh):
  """Batched _prepare_one: pixels [B, N, 3] uint8, size [B, 2], grids [B, 4, h, w], truth [B, N] uint8."""
  return _per_image(functools.partial(_prepare_one, crf=crf), mesh)(pixels, size, grids, truth)


@functools.partial(jax.jit, static_argnames=("crf", "mesh", "gaussian_capacity", "bilateral_capacity"))
def _crf_pass(points, size, energies, truth, *, crf: CRFConfig, mesh: jax.sharding.Mesh, gaussian_capacity: int,
              bilateral_capacity: int):
  """Batched CRF at one capacity: -> mask [B, N] bool, fg [B] int32, counts [B, 2] int32."""
  def one(points, size, energies, truth):
    valid = jnp.arange(energies.shape[0]) < size[0] * size[1]
    q = inference.crf_marginals(points, energies, valid, iterations=crf.iterations,
                                gaussian_weight=crf.gaussian_weight, bilateral_weight=crf.bilateral_weight,
                                gaussian_capacity=gaussian_capacity, bilateral_capacities=(bilateral_capacity,))
    mask = (q[:, 1] > q[:, 0]) & valid  # argmax: ties go to background
    fg, counts = _fg_counts(mask[None], truth, valid)
    return mask, fg[0], counts[0]
  return _per_image(one, mesh)(points, size, energies, truth)


@functools.partial(jax.jit, static_argnames=("crf",))
def _refine_own_size(image, grids, truth, *, crf: CRFConfig):
  """One image at its own size (one compilation per size): -> mask [H, W], fg [5], counts [5, 2]."""
  size = image.shape[:2]
  levels = jnp.stack([upsample(g, size) for g in grids]) > 0.5  # [4, H, W]
  work_size = downscaled_size(size, crf.max_side)
  work_image = image
  if work_size != size:
    work_image = jax.image.resize(image.astype(jnp.float32), (*work_size, 3), method="linear", antialias=True)
    work_image = jnp.clip(jnp.round(work_image), 0, 255).astype(jnp.uint8)
  if crf.iterations == 0:
    mask = levels[3]
  else:
    q = dense_crf(work_image, unary_from_prob(upsample(grids[3], work_size)), iterations=crf.iterations,
                  gaussian_weight=crf.gaussian_weight, bilateral_weight=crf.bilateral_weight, **_crf_params(crf))
    mask = q[..., 1] > q[..., 0]
    mask = mask if work_size == size else nearest_resize(mask, size)
  masks = jnp.concatenate([levels, mask[None]]).reshape(5, -1)
  fg, counts = _fg_counts(masks, truth.reshape(-1), jnp.ones(masks.shape[1], bool))
  return mask, fg, counts


def refine_programs() -> int:
  """Number of refinement programs compiled so far in this process (from the jitted functions' caches)."""
  return sum(f._cache_size() for f in (_prepare, _crf_pass, _refine_own_size))  # pylint: disable=protected-access


def _grids(item: RefineItem) -> np.ndarray:
  """[4, h, w] float32: the three level scores and the fused probability."""
  return np.concatenate([np.asarray(item.level_scores, np.float32),
                         np.asarray(item.fg_prob, np.float32)[None]])


def _truth(item: RefineItem) -> np.ndarray:
  """[H, W] uint8 truth, IGNORE everywhere when there is none."""
  if item.truth is None:
    return np.full(item.image.shape[:2], IGNORE, np.uint8)
  return np.asarray(item.truth, np.uint8)


def _check_item(item: RefineItem) -> None:
  image, fg_prob, scores = np.shape(item.image), np.shape(item.fg_prob), np.shape(item.level_scores)
  if len(image) != 3 or image[-1] != 3 or min(image[:2]) < 1:
    raise ValueError(f"refine: item {item.key!r}: image must be [H, W, 3] RGB, got shape {image}")
  if len(fg_prob) != 2 or scores != (3,) + fg_prob:
    raise ValueError(f"refine: item {item.key!r}: fg_prob must be [h, w] and level_scores [3, h, w], got "
                     f"{fg_prob} and {scores}")
  if item.truth is not None and np.shape(item.truth) != image[:2]:
    raise ValueError(f"refine: item {item.key!r}: truth must be [H, W] = {image[:2]}, got {np.shape(item.truth)}")


def _bucket_of(item: RefineItem, crf: CRFConfig) -> int | None:
  """The item's pixel bucket, or None when it runs at its own size (see the module docstring)."""
  height, width = item.image.shape[:2]
  grid_h, grid_w = np.shape(item.fg_prob)
  if downscaled_size((height, width), crf.max_side) != (height, width) or height < grid_h or width < grid_w:
    return None
  return pixel_bucket(height * width)


def _result(mask: np.ndarray, fg: np.ndarray, counts: np.ndarray, has_truth: bool) -> RefinedImage:
  counts = np.asarray(counts, np.int64) if has_truth else np.zeros((len(FG_LEVELS), 2), np.int64)
  return RefinedImage(mask=np.asarray(mask, bool), fg_pixels=np.asarray(fg, np.int64), counts=counts)


def _run_own_size(item: RefineItem, crf: CRFConfig) -> RefinedImage:
  mask, fg, counts = _refine_own_size(jnp.asarray(item.image, jnp.uint8), jnp.asarray(_grids(item)),
                                      jnp.asarray(_truth(item)), crf=crf)
  return _result(np.asarray(mask), np.asarray(fg), np.asarray(counts), item.truth is not None)


def _run_bucket(items: list[RefineItem], bucket: int, rows: int, crf: CRFConfig,
                mesh: jax.sharding.Mesh) -> Iterator[tuple[Any, RefinedImage]]:
  """Refines up to `rows` items of one bucket as one batch of `rows` (absent rows: zero-sized images)."""
  grid_shape = np.shape(items[0].fg_prob)
  pixels = np.zeros((rows, bucket, 3), np.uint8)
  truth = np.full((rows, bucket), IGNORE, np.uint8)
  size = np.zeros((rows, 2), np.int32)
  grids = np.zeros((rows, 4) + grid_shape, np.float32)
  for row, item in enumerate(items):
    height, width = item.image.shape[:2]
    pixels[row, :height * width] = np.asarray(item.image, np.uint8).reshape(-1, 3)
    truth[row, :height * width] = _truth(item).reshape(-1)
    size[row] = height, width
    grids[row] = _grids(item)
  pixels, size, grids, truth = parallel.shard_batch((pixels, size, grids, truth), mesh)
  prepared = _prepare(pixels, size, grids, truth, crf=crf, mesh=mesh)
  fg, counts = parallel.to_host((prepared["fg"], prepared["counts"]))  # [B, 4], [B, 4, 2]
  if crf.iterations:
    num_points = parallel.to_host(prepared["num_points"])[:len(items)].max(axis=0)  # [2]: Gaussian, bilateral
    gaussian_capacity = bucket_gaussian_capacity(bucket, crf.gaussian_sxy)
    if num_points[0] > gaussian_capacity:
      gaussian_capacity = 3 * bucket  # never overflows
    bilateral_capacity = _reuse_rung((bucket, crf, mesh, gaussian_capacity), bilateral_rungs(bucket),
                                     int(num_points[1]))
    mask, refined_fg, refined_counts = parallel.to_host(_crf_pass(
        prepared["points"], size, prepared["energies"], truth, crf=crf, mesh=mesh, gaussian_capacity=gaussian_capacity,
        bilateral_capacity=bilateral_capacity))
  else:
    mask = parallel.to_host(prepared["fused"])
    refined_fg, refined_counts = fg[:, 3], counts[:, 3]
  for row, item in enumerate(items):
    height, width = item.image.shape[:2]
    yield item.key, _result(mask[row, :height * width].reshape(height, width),
                            np.append(fg[row], refined_fg[row]),
                            np.concatenate([counts[row], refined_counts[row][None]]), item.truth is not None)


def refine_stream(items: Iterable[RefineItem], crf: CRFConfig = CRFConfig(), *, batch_size: int = 1,
                  mesh: jax.sharding.Mesh | None = None) -> Iterator[tuple[Any, RefinedImage]]:
  """Refines a stream of images in a few compiled programs, whatever their sizes.

  Buffers items per (pixel bucket, patch grid), runs full batches of
  batch_size as they fill and the rest at the end, each batch padded to
  batch_size rows (rounded up to the mesh's devices) and sharded over the
  mesh; yields results as they finish (not in input order). Memory: at most
  buckets x batch_size images buffered. Images larger than crf.max_side or
  smaller than the patch grid run one by one at their own size.

  The level masks are upsample(level_scores[l], (H, W)) > 0.5, the fused one
  upsample(fg_prob, (H, W)) > 0.5, the refined one the CRF's argmax (the
  fused mask when crf.iterations == 0).

  Args:
    items: RefineItem stream.
    crf: CRF parameters.
    batch_size: images per batch (>= 1).
    mesh: 1-D device mesh (parallel.batch_mesh); default every device.

  Yields:
    (item.key, RefinedImage).

  Raises:
    ValueError: an item with inconsistent shapes (naming its key), or batch_size < 1.
  """
  if batch_size < 1:
    raise ValueError(f"refine_stream: batch_size must be >= 1, got {batch_size}")
  mesh = parallel.batch_mesh() if mesh is None else mesh
  rows = parallel.padded_size(batch_size, mesh.size)
  pending: dict[tuple, list[RefineItem]] = {}
  for item in items:
    _check_item(item)
    bucket = _bucket_of(item, crf)
    if bucket is None:
      yield item.key, _run_own_size(item, crf)
      continue
    group = pending.setdefault((bucket, np.shape(item.fg_prob)), [])
    group.append(item)
    if len(group) == batch_size:
      yield from _run_bucket(pending.pop((bucket, np.shape(item.fg_prob))), bucket, rows, crf, mesh)
  for (bucket, _), group in pending.items():
    yield from _run_bucket(group, bucket, rows, crf, mesh)


def refine(image: jax.Array, fg_prob: jax.Array, crf: CRFConfig = CRFConfig()) -> np.ndarray:
  """Foreground mask of one image at its own resolution (refine_stream of one item).

  Args:
    image: [H, W, 3] uint8 RGB at the original resolution.
    fg_prob: [h, w] fused foreground probability on the patch grid.
    crf: CRF parameters; iterations = 0 thresholds the upsampled probability
      at 0.5 instead; images larger than crf.max_side are refined at a
      downscaled copy (see CRFConfig).

  Returns:
    [H, W] bool.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"refine: image must be [H, W, 3] RGB, got shape {image.shape}")
  fg_prob = np.asarray(fg_prob, np.float32)
  item = RefineItem(key=None, image=image.astype(np.uint8), fg_prob=fg_prob,
                    level_scores=np.broadcast_to(fg_prob, (3,) + fg_prob.shape), truth=None)
  (_, refined), = refine_stream([item], crf, mesh=parallel.batch_mesh(jax.local_devices()[:1]))
  return refined.mask

"""Stage 5: upsample the patch probability to the image's own resolution and refine it with a dense CRF.

A split of many image sizes runs in a few compiled programs. The CRF needs
only row-major pixels (x = i % W, y = i // W from a traced W), so images are
flattened and packed, one after the other, into canvases: flat arrays of a
fixed pixel count (crf.canvas_pixels, or for an image larger than that the
smallest of PIXEL_BUCKETS that holds it; see canvas_size), up to CANVAS_SLOTS
images each, first fit. Each pixel knows its image (its slot); lattice keys
carry the slot, so the images of a canvas share no lattice point and each is
refined exactly as if it were alone. Canvases are refined in batches (lax.map
on each device: vmap compiled the lattice 2-3x slower) sharded over the mesh.
Per canvas size, two kinds of program:

  _prepare    upsampling of the level scores and the fused probability to
              each image's traced (H, W) (gathers; equal to jax.image.resize
              "linear" when upsampling), the 0.5 thresholds, per-image
              foreground pixels and intersection/union against the truth, the
              unary, and the lattice points of both CRF kernels with their
              point counts;
  _crf_pass   the mean field at one Gaussian and one bilateral capacity rung,
              chosen on the host from those counts (gaussian_rungs,
              bilateral_rungs; a batch whose own rungs are not compiled runs
              at compiled larger ones until that has happened often enough to
              pay for compiling its own, see _capacities), then the argmax
              and its per-image counts.

Compilations over a whole split are therefore bounded by canvas sizes x (1 +
Gaussian rungs x bilateral rungs), whatever the number of distinct sizes, and
are in practice about canvas sizes x 2 plus one per tight pair that enough
canvases wanted (_RECOMPILE_EXCESS): a split of a few dozen VOC photos
compiles 2 programs, a whole VOC split a few more, each of which saves more
than it cost to compile. refine_programs()
reads the count off the jitted functions' caches. Nothing per size is kept, and
packing wastes few pixels (a power-of-two pad per image cost ~1.5x).

Images the gathers cannot take run one by one at their own size (one
compilation per size): those larger than crf.max_side (refined at a
downscaled copy, the mask scaled back by nearest) and those smaller than the
patch grid along a side (resizing down is antialiased by jax.image.resize).
"""

import bisect
import dataclasses
import functools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg import metrics
from jaxseg import parallel
from jaxseg.crf import dense_crf
from jaxseg.crf import hash_table
from jaxseg.crf import inference
from jaxseg.framework.config import CRFConfig

UNARY_EPS = 1e-5  # keeps -log finite; as pydensecrf's unary_from_softmax clips
FG_LEVELS = ("dataset", "category", "image", "fused", "refined")
IGNORE = 255

# Canvases of images larger than crf.canvas_pixels: powers of two up to 2^22 (a 2048 x 2048 image). Each canvas
# size compiles its programs once, and compiling is most of a small split's cost.
PIXEL_BUCKETS = tuple(4096 << k for k in range(11))
CANVAS_SLOTS = 32  # images per canvas at most (static per-image arrays)
# Bilateral capacity rungs as fractions of the canvas, at most a factor 1.5 apart (and 6 = d+1, which can
# never overflow): photos need 0.1-1.35 points per pixel at VOC's parameters (canvases of them 0.5-1.0),
# 0.01-0.12 at pydensecrf's defaults. The blur's cost follows the rung: at 1.5 per pixel instead of 1.0 a
# canvas's CRF took ~10% longer.
_BILATERAL_RUNG_FRACTIONS = (6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.09375,
                             0.0625, 0.046875, 0.03125)
# Gaussian capacity rungs as fractions of a full canvas's area term: the lattice of a W x H grid has
# 2 / sqrt(3) points per unit area plus a perimeter term (inference.gaussian_capacity), so a full canvas of
# images of sides >= ~10 sxy needs 1.0-1.5, a partly filled one less.
_GAUSSIAN_AREA_FRACTIONS = (0.25, 0.5, 0.75, 0.875, 1.0, 1.0625, 1.125, 1.25, 1.5)
# The largest Gaussian rung per canvas pixel. A canvas takes images while the sum of their lattice bounds
# (_cells) stays within it, so no canvas overflows it.
_GAUSSIAN_MAX_PER_PIXEL = 3
# Every (Gaussian, bilateral) capacity pair compiles its own CRF program (~1.3 s on CPU, about 3 canvases'
# CRF), and a canvas runs at any compiled pair that holds it, at the cost of a larger blur: about half a
# canvas's time follows its rows. So: reuse compiled pairs, and compile a canvas's own tight pair once the
# canvases that wanted it ran, in all, _RECOMPILE_EXCESS times its rows in excess (rows run / tight rows - 1
# summed; ski rental: at most about twice the better of the two choices). A pair compiled because no
# compiled one holds a canvas gets headroom (below), so that a split of a few dozen images compiles one.
# Headroom is paid on every canvas, a miss once (a compile): canvases of VOC-like photos vary within +-30%
# in bilateral points (0.55-0.97 per pixel) and +-10% in Gaussian ones (1.02-1.16).
_RECOMPILE_EXCESS = 6.0
_BILATERAL_HEADROOM = 1.4
_GAUSSIAN_HEADROOM = 1.15


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
  layout = _layout(jnp.asarray(size, jnp.int32)[None], num_pixels)
  return _upsample_pixels(jnp.asarray(grids, jnp.float32)[None], layout)


class _Layout(NamedTuple):
  """Where each pixel of a canvas lies: slot [N] (its image, 0 past the last), (y, x) in that image,
  the image's (H, W) (>= 1), and valid [N] (False on padding)."""
  slot: jax.Array
  y: jax.Array
  x: jax.Array
  height: jax.Array
  width: jax.Array
  valid: jax.Array


def _layout(sizes: jax.Array, num_pixels: int) -> _Layout:
  """Images of sizes [S, 2] (H, W; zeros for empty slots) packed row-major one after the other into N pixels."""
  areas = sizes[:, 0] * sizes[:, 1]
  ends = hash_table.running_count(areas)  # one small matmul: jnp.cumsum compiled more kernels
  index = jnp.arange(num_pixels, dtype=jnp.int32)
  # Against all CANVAS_SLOTS ends at once: faster than the default binary search's loop, and no loop to compile.
  slot = jnp.searchsorted(ends, index, side="right", method="compare_all").astype(jnp.int32)
  valid = slot < sizes.shape[0]
  slot = jnp.where(valid, slot, 0)
  # One gather of each pixel's image (first pixel, H, W), not three: each was a kernel to compile.
  start, height, width = hash_table.take(jnp.stack([ends - areas, *jnp.maximum(sizes, 1).T], axis=-1), slot).T
  local = index - start
  return _Layout(slot, local // width, local % width, height, width, valid)


def _upsample_pixels(grids: jax.Array, layout: _Layout) -> jax.Array:
  """grids [S, K, h, w] float32 -> [K, N]: each pixel bilinearly interpolated in its own image's grids."""
  top, bottom, fy = _axis_taps(layout.y, layout.height, grids.shape[2])
  left, right, fx = _axis_taps(layout.x, layout.width, grids.shape[3])
  tap = lambda row, col: grids[layout.slot, :, row, col].T  # [K, N]
  upper = tap(top, left) * (1 - fx) + tap(top, right) * fx
  lower = tap(bottom, left) * (1 - fx) + tap(bottom, right) * fx
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


def canvas_size(num_pixels: int, canvas_pixels: int) -> int | None:
  """Pixels of the canvas an image of num_pixels pixels is packed into: canvas_pixels (crf.canvas_pixels) if
  it fits, else the smallest of PIXEL_BUCKETS that holds it; None past the largest."""
  return canvas_pixels if num_pixels <= canvas_pixels else pixel_bucket(num_pixels)


def fitted_canvas(crf: CRFConfig, num_pixels: int) -> CRFConfig:
  """crf with canvas_pixels lowered to the power of two that holds num_pixels (a whole job), when smaller:
  a job that needs no room for more images does less work, with the same result."""
  whole = pixel_bucket(num_pixels)
  return dataclasses.replace(crf, canvas_pixels=whole) if whole is not None and whole < crf.canvas_pixels else crf


def bilateral_rungs(canvas: int) -> tuple[int, ...]:
  """Descending static bilateral capacities of a canvas of `canvas` pixels."""
  return tuple(sorted({int(np.ceil(canvas * f)) for f in _BILATERAL_RUNG_FRACTIONS}, reverse=True))


def gaussian_rungs(canvas: int, sxy: float) -> tuple[int, ...]:
  """Descending static Gaussian capacities of a canvas: fractions of a full canvas's area term, and 3 per pixel."""
  area = 2.0 / np.sqrt(3.0) * canvas / sxy ** 2
  top = _GAUSSIAN_MAX_PER_PIXEL * canvas
  rungs = {min(top, int(np.ceil(f * area)) + 64) for f in _GAUSSIAN_AREA_FRACTIONS}
  return tuple(sorted(rungs | {top}, reverse=True))


def _fitting(rungs: tuple[int, ...], num_points: float) -> int:
  """The smallest rung that holds num_points (the largest if none does)."""
  return min((r for r in rungs if r >= num_points), default=max(rungs))


# Per (canvas, CRF, mesh): the capacity pairs compiled in this process, and for each pair not compiled yet
# the excess rows of the canvases that wanted it (floats, no arrays).
_COMPILED: dict[tuple, set[tuple[int, int]]] = {}
_WANTED: dict[tuple, dict[tuple[int, int], float]] = {}


def _capacities(program: tuple, rungs: tuple[tuple[int, ...], tuple[int, ...]],
                num_points: tuple[int, int]) -> tuple[int, int]:
  """The (Gaussian, bilateral) capacities a batch of `num_points` (its largest counts) runs at.

  Its own tight pair if compiled; else the smallest compiled pair that holds it, until the batches that
  wanted the tight pair ran _RECOMPILE_EXCESS times its rows in excess (then that compiles); when no
  compiled pair holds it, a pair with headroom compiles. The result does not depend on the choice: absent
  lattice points are zero rows.
  """
  tight = tuple(_fitting(r, n) for r, n in zip(rungs, num_points))
  compiled, wanted = _COMPILED.setdefault(program, set()), _WANTED.setdefault(program, {})
  holding = [pair for pair in compiled if pair[0] >= num_points[0] and pair[1] >= num_points[1]]
  if tight in compiled:
    return tight
  if holding:
    chosen = min(holding, key=sum)
    wanted[tight] = wanted.get(tight, 0.0) + sum(chosen) / sum(tight) - 1.0
    if wanted[tight] < _RECOMPILE_EXCESS:
      return chosen
  else:
    headroom = (_GAUSSIAN_HEADROOM, _BILATERAL_HEADROOM)
    tight = tuple(_fitting(r, n * h) for r, n, h in zip(rungs, num_points, headroom))
  compiled.add(tight)
  return tight


def _fg_counts(masks: jax.Array, truth: jax.Array, valid: jax.Array):
  """masks [K, N] bool, truth [N] uint8 (IGNORE where absent), valid [N] -> fg [K] int32, counts [K, 2] int32."""
  masks = masks & valid
  counts = jax.vmap(metrics.foreground_counts, in_axes=(0, None, None))(masks, truth, IGNORE)
  return jnp.sum(masks, axis=-1, dtype=jnp.int32), counts


def _slot_counts(masks: jax.Array, truth: jax.Array, layout: _Layout, num_slots: int):
  """_fg_counts of each image of a canvas: masks [K, N] bool -> fg [S, K] int32, counts [S, K, 2] int32."""
  masks = masks & layout.valid
  counted = truth != IGNORE  # as metrics.foreground_counts
  truth_fg, predicted = counted & (truth != 0), masks & counted
  columns = jnp.concatenate([masks, predicted & truth_fg, predicted | truth_fg]).T.astype(jnp.int32)  # [N, 3K]
  per_slot = jax.ops.segment_sum(columns, layout.slot, num_slots).reshape(num_slots, 3, -1)
  return per_slot[:, 0], jnp.stack([per_slot[:, 1], per_slot[:, 2]], axis=-1)


def _crf_params(crf: CRFConfig) -> dict:
  return dict(gaussian_sxy=crf.gaussian_sxy, bilateral_sxy=crf.bilateral_sxy, bilateral_srgb=crf.bilateral_srgb)


def _prepare_canvas(pixels, sizes, grids, truth, *, crf: CRFConfig):
  """One canvas: per-image level masks and counts, the unary, the kernels' lattice points (see _prepare)."""
  layout = _layout(sizes, pixels.shape[0])
  probs = _upsample_pixels(grids, layout)  # [4, N]: dataset, category, image, fused
  fg, counts = _slot_counts(probs > 0.5, truth, layout, sizes.shape[0])
  out = dict(fg=fg, counts=counts, fused=(probs[3] > 0.5) & layout.valid)
  if crf.iterations:
    out["energies"] = unary_from_prob(probs[3])
    position = jnp.stack([layout.x, layout.y], axis=-1).astype(jnp.float32)
    out["points"] = inference.kernel_points(pixels, layout.valid, position, segment=layout.slot,
                                            num_segments=sizes.shape[0], **_crf_params(crf))
    out["num_points"] = jnp.stack([inference.num_points(out["points"].gaussian),
                                   inference.num_points(out["points"].bilateral)])
  return out


def _per_canvas(fn, mesh: jax.sharding.Mesh):
  """fn(*row) over the leading axis of batched arguments; each device runs its rows one by one (lax.map).

  The second argument of every row is its image sizes [S, 2]; with several
  rows per device, rows with no image (batch padding) are skipped and give
  zeros (with one, a padding row runs as an empty canvas; nothing reads its
  outputs). A sequential map compiles the canvas's program once; vmapped, the
  lattice's while loops and scatters compiled 2-3x slower, and compiling is
  most of a split's refinement.
  """
  fn = jax.jit(fn)  # traced once: eval_shape's trace is cached for the branch below

  def one(row):
    empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *row))
    return jax.lax.cond(jnp.any(row[1][:, 0] * row[1][:, 1] > 0), lambda row: fn(*row), lambda row: empty, row)

  def rows(*args):
    if args[1].shape[0] == 1:
      # One row per device (as batch_size 1 on one device): no map, and no skip branch. Each of their
      # output writes and zero fills is a kernel of its own, ~15 ms of compiling per output.
      return jax.tree.map(lambda x: x[None], fn(*jax.tree.map(lambda x: x[0], args)))
    return jax.lax.map(one, args)

  spec = jax.sharding.PartitionSpec(parallel.AXIS)
  return jax.shard_map(rows, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


@functools.partial(jax.jit, static_argnames=("crf", "mesh"))
def _prepare(pixels, sizes, grids, truth, *, crf: CRFConfig, mesh: jax.sharding.Mesh):
  """Batched _prepare_canvas: pixels [B, N, 3] uint8, sizes [B, S, 2], grids [B, S, 4, h, w], truth [B, N] uint8.

  -> fg [B, S, 4], counts [B, S, 4, 2], fused [B, N] and, with the CRF, energies [B, N, 2], points
  (KernelPoints) and num_points [B, 2] (Gaussian, bilateral).
  """
  return _per_canvas(functools.partial(_prepare_canvas, crf=crf), mesh)(pixels, sizes, grids, truth)


@functools.partial(jax.jit, static_argnames=("crf", "mesh", "gaussian_capacity", "bilateral_capacity"))
def _crf_pass(points, sizes, energies, truth, *, crf: CRFConfig, mesh: jax.sharding.Mesh, gaussian_capacity: int,
              bilateral_capacity: int):
  """Batched CRF at one capacity: -> mask [B, N] bool, fg [B, S] int32, counts [B, S, 2] int32."""
  def one(points, sizes, energies, truth):
    layout = _layout(sizes, energies.shape[0])
    q = inference.crf_marginals(points, energies, layout.valid, iterations=crf.iterations,
                                gaussian_weight=crf.gaussian_weight, bilateral_weight=crf.bilateral_weight,
                                gaussian_capacity=gaussian_capacity, bilateral_capacities=(bilateral_capacity,))
    mask = (q[:, 1] > q[:, 0]) & layout.valid  # argmax: ties go to background
    fg, counts = _slot_counts(mask[None], truth, layout, sizes.shape[0])
    return mask, fg[:, 0], counts[:, 0]
  return _per_canvas(one, mesh)(points, sizes, energies, truth)


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


def _canvas_of(item: RefineItem, crf: CRFConfig) -> int | None:
  """The item's canvas size, or None when it runs at its own size (see the module docstring)."""
  height, width = item.image.shape[:2]
  grid_h, grid_w = np.shape(item.fg_prob)
  if downscaled_size((height, width), crf.max_side) != (height, width) or height < grid_h or width < grid_w:
    return None
  canvas = canvas_size(height * width, crf.canvas_pixels)
  # A very thin image's Gaussian lattice may outgrow the canvas's largest rung: its own size then.
  return canvas if canvas is None or _cells(item, crf) <= _GAUSSIAN_MAX_PER_PIXEL * canvas else None


def _cells(item: RefineItem, crf: CRFConfig) -> int:
  """Static bound on the item's Gaussian lattice points (inference.gaussian_capacity)."""
  return inference.gaussian_capacity(item.image.shape[0], item.image.shape[1], crf.gaussian_sxy)


def _result(mask: np.ndarray, fg: np.ndarray, counts: np.ndarray, has_truth: bool) -> RefinedImage:
  counts = np.asarray(counts, np.int64) if has_truth else np.zeros((len(FG_LEVELS), 2), np.int64)
  return RefinedImage(mask=np.asarray(mask, bool), fg_pixels=np.asarray(fg, np.int64), counts=counts)


def _run_own_size(item: RefineItem, crf: CRFConfig) -> RefinedImage:
  mask, fg, counts = _refine_own_size(jnp.asarray(item.image, jnp.uint8), jnp.asarray(_grids(item)),
                                      jnp.asarray(_truth(item)), crf=crf)
  return _result(np.asarray(mask), np.asarray(fg), np.asarray(counts), item.truth is not None)


class _Canvas:
  """Items packed one after the other into `pixels` pixels (host side, before refinement)."""

  def __init__(self, pixels: int, crf: CRFConfig):
    self.pixels, self.crf, self.used, self.cells, self.items = pixels, crf, 0, 0, []

  def fits(self, item: RefineItem) -> bool:
    return (len(self.items) < CANVAS_SLOTS and self.used + _area(item) <= self.pixels
            and self.cells + _cells(item, self.crf) <= _GAUSSIAN_MAX_PER_PIXEL * self.pixels)

  def add(self, item: RefineItem) -> None:
    self.items.append(item)
    self.used += _area(item)
    self.cells += _cells(item, self.crf)

  def placed(self) -> Iterator[tuple[int, int, RefineItem]]:
    """(slot, first pixel, item) of each image, in packing order."""
    start = 0
    for slot, item in enumerate(self.items):
      yield slot, start, item
      start += _area(item)


def _area(item: RefineItem) -> int:
  return item.image.shape[0] * item.image.shape[1]


def _run_canvases(canvases: list[_Canvas], rows: int, crf: CRFConfig,
                  mesh: jax.sharding.Mesh) -> Iterator[tuple[Any, RefinedImage]]:
  """Refines up to `rows` canvases of one size and patch grid as one batch of `rows` (absent rows: empty)."""
  num_pixels, grid_shape = canvases[0].pixels, np.shape(canvases[0].items[0].fg_prob)
  pixels = np.zeros((rows, num_pixels, 3), np.uint8)
  truth = np.full((rows, num_pixels), IGNORE, np.uint8)
  sizes = np.zeros((rows, CANVAS_SLOTS, 2), np.int32)
  grids = np.zeros((rows, CANVAS_SLOTS, 4) + grid_shape, np.float32)
  for row, canvas in enumerate(canvases):
    for slot, start, item in canvas.placed():
      end = start + _area(item)
      pixels[row, start:end] = np.asarray(item.image, np.uint8).reshape(-1, 3)
      truth[row, start:end] = _truth(item).reshape(-1)
      sizes[row, slot] = item.image.shape[:2]
      grids[row, slot] = _grids(item)
  pixels, sizes, grids, truth = parallel.shard_batch((pixels, sizes, grids, truth), mesh)
  prepared = _prepare(pixels, sizes, grids, truth, crf=crf, mesh=mesh)
  fg, counts = parallel.to_host((prepared["fg"], prepared["counts"]))  # [B, S, 4], [B, S, 4, 2]
  if crf.iterations:
    num_points = parallel.to_host(prepared["num_points"])[:len(canvases)].max(axis=0)  # [2]: Gaussian, bilateral
    gaussian_capacity, bilateral_capacity = _capacities(
        (num_pixels, crf, mesh), (gaussian_rungs(num_pixels, crf.gaussian_sxy), bilateral_rungs(num_pixels)),
        (int(num_points[0]), int(num_points[1])))
    mask, refined_fg, refined_counts = parallel.to_host(_crf_pass(
        prepared["points"], sizes, prepared["energies"], truth, crf=crf, mesh=mesh,
        gaussian_capacity=gaussian_capacity, bilateral_capacity=bilateral_capacity))
  else:
    mask = parallel.to_host(prepared["fused"])
    refined_fg, refined_counts = fg[:, :, 3], counts[:, :, 3]
  for row, canvas in enumerate(canvases):
    for slot, start, item in canvas.placed():
      yield item.key, _result(mask[row, start:start + _area(item)].reshape(item.image.shape[:2]),
                              np.append(fg[row, slot], refined_fg[row, slot]),
                              np.concatenate([counts[row, slot], refined_counts[row, slot][None]]),
                              item.truth is not None)


# Canvases held open per (canvas size, patch grid) beyond a batch's rows: an image goes into the first open
# canvas it fits in, so packing stays dense; when none has room, the fullest `rows` are refined.
_OPEN_SLACK = 3


def refine_stream(items: Iterable[RefineItem], crf: CRFConfig = CRFConfig(), *, batch_size: int = 1,
                  mesh: jax.sharding.Mesh | None = None) -> Iterator[tuple[Any, RefinedImage]]:
  """Refines a stream of images in a few compiled programs, whatever their sizes.

  Packs items into canvases per (canvas size, patch grid), first fit, and
  refines batches of batch_size canvases (rounded up to the mesh's devices,
  sharded over the mesh) as canvases fill, the rest at the end; yields results
  as they finish (not in input order). Memory: at most batch_size + 3 canvases
  buffered per (canvas size, patch grid). Images larger than crf.max_side or
  smaller than the patch grid run one by one at their own size. Packing does
  not change any result: the images of a canvas are independent CRFs.

  The level masks are upsample(level_scores[l], (H, W)) > 0.5, the fused one
  upsample(fg_prob, (H, W)) > 0.5, the refined one the CRF's argmax (the
  fused mask when crf.iterations == 0).

  Args:
    items: RefineItem stream.
    crf: CRF parameters.
    batch_size: canvases per batch (>= 1); each canvas holds up to CANVAS_SLOTS images.
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
  open_canvases: dict[tuple, list[_Canvas]] = {}
  for item in items:
    _check_item(item)
    canvas_size = _canvas_of(item, crf)
    if canvas_size is None:
      yield item.key, _run_own_size(item, crf)
      continue
    group = open_canvases.setdefault((canvas_size, np.shape(item.fg_prob)), [])
    target = next((canvas for canvas in group if canvas.fits(item)), None)
    if target is None:
      if len(group) >= rows + _OPEN_SLACK:
        group.sort(key=lambda canvas: -canvas.used)
        yield from _run_canvases(group[:rows], rows, crf, mesh)
        del group[:rows]
      target = _Canvas(canvas_size, crf)
      group.append(target)
    target.add(item)
  for group in open_canvases.values():
    for start in range(0, len(group), rows):
      yield from _run_canvases(group[start:start + rows], rows, crf, mesh)


def refine(image: jax.Array, fg_prob: jax.Array, crf: CRFConfig = CRFConfig()) -> np.ndarray:
  """Foreground mask of one image at its own resolution (refine_stream of one item, on a canvas of the
  image's own power-of-two size when that is smaller than crf.canvas_pixels).

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
  (_, refined), = refine_stream([item], fitted_canvas(crf, _area(item)),
                                mesh=parallel.batch_mesh(jax.local_devices()[:1]))
  return refined.mask

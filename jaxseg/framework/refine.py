"""Stage 5: refine each image's foreground probability with a dense CRF at the image's own resolution.

    masks = refine_batch(images, fg_prob, CRFParams())        # [H, W] bool each, in input order

A Refiner does the work and owns its state. Each image is prepared on the host
(refine_resize: an image whose longer side exceeds options.max_side is scaled
down to it, its probability resized linearly to the working size), packed with
others into canvases of a few fixed pixel counts (refine_pack), and the
canvases are refined in batches by two compiled programs per canvas size and
lattice capacity (refine_programs). A split of any number of sizes therefore
compiles at most canvas sizes x (1 + capacity pairs) programs; the Refiner
counts the ones it ran (num_programs).

Capacities: the lattices' point counts are data dependent, XLA's shapes
static. Per canvas size the Refiner keeps one (Gaussian, bilateral) capacity,
rungs of the one capacity ladder (crf.lattice.capacity_ladder), chosen with
headroom from the first batch's counted points; a batch that needs more moves
it up. A batch whose marginals are not all finite runs again one rung up (at
the top rungs, which can never overflow, it is an error): no non-finite
marginal is ever read as background.
"""

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxseg import parallel
from jaxseg.crf import lattice
from jaxseg.framework import refine_programs
from jaxseg.framework.config import CRFConfig
from jaxseg.framework.config import CRFParams
from jaxseg.framework.config import RefineOptions
from jaxseg.framework.refine_pack import PIXEL_BUCKETS
from jaxseg.framework.refine_pack import Canvas
from jaxseg.framework.refine_pack import Work
from jaxseg.framework.refine_pack import canvas_arrays
from jaxseg.framework.refine_pack import canvas_size
from jaxseg.framework.refine_pack import fitted_canvas_pixels
from jaxseg.framework.refine_resize import downscale_image
from jaxseg.framework.refine_resize import downscaled_size
from jaxseg.framework.refine_resize import nearest_resize
from jaxseg.framework.refine_resize import resize_linear

# Capacity headroom over the first batch's counted points (Gaussian, bilateral): canvases of VOC-like photos
# vary within +-10% in Gaussian points and +-30% in bilateral ones; headroom is paid on every canvas, a
# capacity that proves too small costs one more program.
HEADROOM = (1.15, 1.4)
# Canvases held open per canvas size beyond a batch's rows: an image goes into the first open canvas it fits
# in, so packing stays dense; when none has room, the fullest `rows` are refined.
_OPEN_SLACK = 3


class RefineItem(NamedTuple):
  """One image of a stream: key (handed back with its mask), image [H, W, 3] uint8 RGB, fg_prob [h, w] float
  foreground probability on the patch grid (any h, w; resized linearly to the image)."""
  key: Any
  image: np.ndarray
  fg_prob: np.ndarray


def _checked(key: Any, image, fg_prob) -> tuple[np.ndarray, np.ndarray]:
  """image as uint8 [H, W, 3] and fg_prob as finite float32 [h, w], or ValueError naming the key."""
  image, fg_prob = np.asarray(image), np.asarray(fg_prob)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f"refine: image {key!r} must be uint8 RGB [H, W, 3], got {image.dtype} {image.shape} "
                     "(no conversion: scale and round other data to uint8 first)")
  if fg_prob.ndim != 2 or min(fg_prob.shape) < 1 or not np.issubdtype(fg_prob.dtype, np.floating):
    raise ValueError(f"refine: fg_prob of image {key!r} must be float [h, w], got {fg_prob.dtype} {fg_prob.shape}")
  if not np.isfinite(fg_prob).all():
    raise ValueError(f"refine: fg_prob of image {key!r} has {int((~np.isfinite(fg_prob)).sum())} non-finite values")
  return image, fg_prob.astype(np.float32)


def _rung(ladder: tuple[int, ...], num_points: float) -> int:
  """The smallest rung of a descending ladder that holds num_points (the top if none does)."""
  return min((r for r in ladder if r >= num_points), default=ladder[0])


class Refiner:
  """Refines images with one set of CRF parameters; owns its capacity choices and counts its programs.

  Two Refiners share nothing but jax's own compilation cache: an identical
  program compiles once per process.

  Attributes:
    params, options: as given.
    mesh: 1-D device mesh the canvases of a batch are sharded over (default: this process's devices).
    capacities: canvas pixels -> (Gaussian, bilateral) lattice capacity its canvases run at.
    programs: the distinct compiled programs this Refiner ran, as (kind, canvas pixels[, capacities]).
  """

  def __init__(self, params: CRFParams = CRFParams(), options: RefineOptions = RefineOptions(), *,
               mesh: jax.sharding.Mesh | None = None):
    if options.batch_size < 1:
      raise ValueError(f"Refiner: options.batch_size must be >= 1, got {options.batch_size}")
    self.params, self.options = params, options
    self.mesh = parallel.batch_mesh(jax.local_devices()) if mesh is None else mesh
    self.capacities: dict[int, tuple[int, int]] = {}
    self.programs: set[tuple] = set()

  @property
  def num_programs(self) -> int:
    return len(self.programs)

  def work(self, key: Any, image, fg_prob) -> Work:
    """One image checked and at its working size (downscaled above options.max_side)."""
    image, fg_prob = _checked(key, image, fg_prob)
    size = image.shape[:2]
    work_size = downscaled_size(size, self.options.max_side)
    return Work(key, downscale_image(image, work_size), resize_linear(fg_prob, work_size), size)

  def stream(self, items: Iterable[RefineItem | tuple]) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, [H, W] bool mask) for each (key, image, fg_prob) item, as canvases finish (not in input order).

    Memory: at most batch_size + 3 canvases open per canvas size.
    """
    rows = parallel.padded_size(self.options.batch_size, self.mesh.size)
    open_canvases: dict[int, list[Canvas]] = {}
    for key, image, fg_prob in items:
      work = self.work(key, image, fg_prob)
      pixels = canvas_size(*work.image.shape[:2], self.options.canvas_pixels, self.params.gaussian_sxy)
      if pixels is None:
        raise ValueError(f"refine: image {key!r} of {work.image.shape[:2]} pixels exceeds the largest canvas "
                         f"({PIXEL_BUCKETS[-1]} pixels); set max_side")
      group = open_canvases.setdefault(pixels, [])
      target = next((canvas for canvas in group if canvas.fits(work)), None)
      if target is None:
        if len(group) >= rows + _OPEN_SLACK:
          group.sort(key=lambda canvas: -canvas.used)
          yield from self._refine(group[:rows], rows)
          del group[:rows]
        target = Canvas(pixels, self.params.gaussian_sxy)
        group.append(target)
      target.add(work)
    for group in open_canvases.values():
      for start in range(0, len(group), rows):
        yield from self._refine(group[start:start + rows], rows)

  def choose_capacities(self, pixels: int, num_points: tuple[int, int]) -> tuple[int, int]:
    """The (Gaussian, bilateral) capacities for a batch of canvases of `pixels` pixels needing num_points:
    the canvas size's current pair, moved up (with HEADROOM) when the batch needs more."""
    current = self.capacities.get(pixels)
    if current is None or num_points[0] > current[0] or num_points[1] > current[1]:
      wanted = tuple(_rung(ladder, n * h) for ladder, n, h in zip(_ladders(pixels), num_points, HEADROOM))
      current = wanted if current is None else (max(current[0], wanted[0]), max(current[1], wanted[1]))
      self.capacities[pixels] = current
    return current

  def _refine(self, canvases: list[Canvas], rows: int) -> Iterator[tuple[Any, np.ndarray]]:
    """Refines up to `rows` canvases of one size as one batch; yields (key, mask) of their images."""
    pixels, prob, sizes = canvas_arrays(canvases, rows)
    if self.params.iterations == 0:
      masks = prob > 0.5
    else:
      masks = self._crf_masks(canvases[0].pixels, len(canvases), pixels, prob, sizes)
    for row, canvas in enumerate(canvases):
      for _, start, work in canvas.placed():
        mask = masks[row, start:start + work.prob.size].reshape(work.prob.shape)
        yield work.key, mask if mask.shape == work.size else nearest_resize(mask, work.size)

  def _crf_masks(self, num_pixels: int, num_canvases: int, pixels, prob, sizes) -> np.ndarray:
    """[rows, N] bool CRF argmax of a batch, rerun one rung up while some marginal is not finite."""
    pixels, prob, sizes = parallel.shard_batch((pixels, prob, sizes), self.mesh)
    energies, points, num_points = refine_programs.prepare(pixels, sizes, prob, params=self.params, mesh=self.mesh)
    self.programs.add(("prepare", num_pixels))
    needed = tuple(int(n) for n in parallel.to_host(num_points)[:num_canvases].max(axis=0))
    capacities = self.choose_capacities(num_pixels, needed)
    while True:
      masks, finite = parallel.to_host(refine_programs.crf(points, sizes, energies, params=self.params,
                                                           mesh=self.mesh, capacities=capacities))
      self.programs.add(("crf", num_pixels, capacities))
      if finite[:num_canvases].all():
        return masks
      ladders = _ladders(num_pixels)
      if capacities == (ladders[0][0], ladders[1][0]):
        raise FloatingPointError(f"refine: non-finite CRF marginals at the largest lattice capacities "
                                 f"{capacities} (canvas of {num_pixels} pixels)")
      capacities = tuple(max(_rung(ladder, c + 1), _rung(ladder, n * h))
                         for ladder, c, n, h in zip(ladders, capacities, needed, HEADROOM))
      self.capacities[num_pixels] = capacities


def _ladders(pixels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The capacity ladders of a canvas's Gaussian (2-D) and bilateral (5-D) lattices."""
  return lattice.capacity_ladder(pixels, 2), lattice.capacity_ladder(pixels, 5)


def refine_stream(items: Iterable[RefineItem | tuple], params: CRFParams = CRFParams(),
                  options: RefineOptions | None = None, *,
                  mesh: jax.sharding.Mesh | None = None) -> Iterator[tuple[Any, np.ndarray]]:
  """Refiner(params, options, mesh=mesh).stream(items): (key, [H, W] bool mask), not in input order."""
  return Refiner(params, options or RefineOptions(), mesh=mesh).stream(items)


def refine_batch(images: Sequence[np.ndarray], fg_prob: Sequence[np.ndarray], params: CRFParams = CRFParams(),
                 options: RefineOptions | None = None) -> list[np.ndarray]:
  """Refined foreground masks of images of any sizes, in input order.

  Args:
    images: B images, each [H, W, 3] uint8 RGB at its original resolution
      (anything else raises ValueError naming its dtype and shape).
    fg_prob: B foreground probabilities on the patch grid, each [h, w] float
      (e.g. an array [B, h, w]).
    params: the CRF's parameters; iterations = 0 thresholds the linearly
      resized probability at 0.5 instead.
    options: how to run (RefineOptions(); canvases are lowered to what the
      batch needs). Images above options.max_side are refined at a copy
      scaled down to it and their mask scaled back (nearest).

  Returns:
    B [H, W] bool masks.
  """
  if len(images) != len(fg_prob):
    raise ValueError(f"refine_batch: {len(images)} images but {len(fg_prob)} fg_prob maps")
  options = options or RefineOptions()
  checked = [_checked(i, image, prob) for i, (image, prob) in enumerate(zip(images, fg_prob))]
  total = sum(int(np.prod(downscaled_size(image.shape[:2], options.max_side))) for image, _ in checked)
  options = dataclasses.replace(options, canvas_pixels=fitted_canvas_pixels(total, options.canvas_pixels))
  masks = dict(refine_stream(((i, image, prob) for i, (image, prob) in enumerate(checked)), params, options))
  return [masks[i] for i in range(len(images))]


def refine(image: np.ndarray, fg_prob: np.ndarray, crf: CRFParams | CRFConfig = CRFParams()) -> np.ndarray:
  """[H, W] bool mask of one image: refine_batch([image], [fg_prob], ...)[0]. crf: CRFParams, or a config
  file's CRFConfig (its parameters and options)."""
  params, options = (crf.params, crf.options) if isinstance(crf, CRFConfig) else (crf, None)
  return refine_batch([image], [fg_prob], params, options)[0]

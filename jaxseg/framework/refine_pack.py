"""First-fit packing of images into canvases: flat arrays of a few fixed pixel counts (host side).

The CRF needs only row-major pixels, so images are flattened and packed one
after the other into a canvas of canvas_pixels pixels (or, for an image larger
than that, the smallest of PIXEL_BUCKETS that holds it), up to CANVAS_SLOTS
images each. A split of many sizes then compiles programs per canvas size, not
per image size. Each pixel knows its slot, and the CRF keeps slots apart, so
packing changes no result.
"""

import bisect
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from jaxseg.crf import inference

# Powers of two up to 2^22 (a 2048 x 2048 image): each canvas size compiles its own programs.
PIXEL_BUCKETS = tuple(4096 << k for k in range(11))
CANVAS_SLOTS = 32  # images per canvas at most (static per-image arrays)
# Gaussian lattice points per canvas pixel at most: the top of its capacity ladder (d + 1 = 3).
GAUSSIAN_POINTS_PER_PIXEL = 3


class Work(NamedTuple):
  """One image as the CRF sees it: key, image [H, W, 3] uint8 and fg_prob [H, W] float32 at the working size,
  and the size (H0, W0) its mask is returned at."""
  key: Any
  image: np.ndarray
  prob: np.ndarray
  size: tuple[int, int]


def pixel_bucket(num_pixels: int) -> int | None:
  """The smallest of PIXEL_BUCKETS >= num_pixels, or None past the largest."""
  i = bisect.bisect_left(PIXEL_BUCKETS, num_pixels)
  return PIXEL_BUCKETS[i] if i < len(PIXEL_BUCKETS) else None


def gaussian_cells(height: int, width: int, gaussian_sxy: float) -> int:
  """Static bound on the Gaussian lattice points of an H x W image."""
  return inference.gaussian_capacity(height, width, gaussian_sxy)


def canvas_size(height: int, width: int, canvas_pixels: int, gaussian_sxy: float) -> int | None:
  """Pixels of the canvas an H x W image goes into: canvas_pixels if it fits (pixels and Gaussian lattice
  bound), else the smallest of PIXEL_BUCKETS that does; None past the largest."""
  cells = gaussian_cells(height, width, gaussian_sxy)
  needed = max(height * width, -(-cells // GAUSSIAN_POINTS_PER_PIXEL))
  return canvas_pixels if needed <= canvas_pixels else pixel_bucket(needed)


def fitted_canvas_pixels(total_pixels: int, canvas_pixels: int) -> int:
  """canvas_pixels lowered to the power of two that holds a whole job of total_pixels, when smaller: a job
  that needs no room for more images does less work, with the same result."""
  whole = pixel_bucket(total_pixels)
  return whole if whole is not None and whole < canvas_pixels else canvas_pixels


@dataclasses.dataclass
class Canvas:
  """Images packed one after the other into `pixels` pixels."""
  pixels: int
  gaussian_sxy: float
  works: list[Work] = dataclasses.field(default_factory=list)
  used: int = 0
  cells: int = 0

  def fits(self, work: Work) -> bool:
    height, width = work.image.shape[:2]
    return (len(self.works) < CANVAS_SLOTS and self.used + height * width <= self.pixels
            and self.cells + gaussian_cells(height, width, self.gaussian_sxy)
            <= GAUSSIAN_POINTS_PER_PIXEL * self.pixels)

  def add(self, work: Work) -> None:
    height, width = work.image.shape[:2]
    self.works.append(work)
    self.used += height * width
    self.cells += gaussian_cells(height, width, self.gaussian_sxy)

  def placed(self) -> Iterator[tuple[int, int, Work]]:
    """(slot, first pixel, work) of each image, in packing order."""
    start = 0
    for slot, work in enumerate(self.works):
      yield slot, start, work
      start += work.image.shape[0] * work.image.shape[1]


def canvas_arrays(canvases: list[Canvas], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Up to `rows` canvases of one size as arrays (absent rows: empty).

  Returns:
    pixels [rows, N, 3] uint8, prob [rows, N] float32, sizes [rows, CANVAS_SLOTS, 2] int32 ((H, W) per
    slot, zeros when empty).
  """
  num_pixels = canvases[0].pixels
  pixels = np.zeros((rows, num_pixels, 3), np.uint8)
  prob = np.zeros((rows, num_pixels), np.float32)
  sizes = np.zeros((rows, CANVAS_SLOTS, 2), np.int32)
  for row, canvas in enumerate(canvases):
    for slot, start, work in canvas.placed():
      end = start + work.prob.size
      pixels[row, start:end] = work.image.reshape(-1, 3)
      prob[row, start:end] = work.prob.reshape(-1)
      sizes[row, slot] = work.image.shape[:2]
  return pixels, prob, sizes

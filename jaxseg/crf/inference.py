"""Mean-field inference in a fully connected CRF, as pydensecrf's DenseCRF2D computes it."""

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import grid as grid_lib
from jaxseg.crf import lattice as lattice_lib
from jaxseg.crf.lattice import Lattice, lattice_filter, scaled_filter


def gaussian_features(height: int, width: int, sxy: float) -> np.ndarray:
  """[H*W, 2] float32 features (x / sxy, y / sxy), row-major pixels."""
  y, x = np.mgrid[:height, :width].astype(np.float32)
  return np.stack([x, y], axis=-1).reshape(-1, 2) / np.float32(sxy)


def flat_positions(num_pixels: int, width: jnp.ndarray) -> jnp.ndarray:
  """[N, 2] float32 (x, y) of row-major pixels 0..N-1 of an image `width` wide (traced or static)."""
  index = jnp.arange(num_pixels, dtype=jnp.int32)
  return jnp.stack([index % width, index // width], axis=-1).astype(jnp.float32)


def crf_features(pixels: jnp.ndarray, valid: jnp.ndarray, position: jnp.ndarray, *, gaussian_sxy: float,
                 bilateral_sxy: float, bilateral_srgb: float) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Features of both kernels of a flat image, pydensecrf's (x/sxy, y/sxy) and (x/sxy, y/sxy, rgb/srgb).

  Invalid pixels take the features of the first valid one: their simplex
  vertices are then lattice points that exist anyway, so they add no point
  and change no blur (a zero point created by them would still pass mass on).

  Args:
    pixels: [N, 3] uint8 RGB.
    valid: [N] bool.
    position: [N, 2] float32 (x, y) of each pixel, e.g. flat_positions(N, W) for row-major pixels.

  Returns:
    ([N, 2] float32, [N, 5] float32).
  """
  features = jnp.concatenate([position / np.float32(bilateral_sxy),
                              pixels.astype(jnp.float32) / np.float32(bilateral_srgb),
                              position / np.float32(gaussian_sxy)], axis=-1)
  features = _valid_features(features, valid)
  return features[:, 5:], features[:, :5]


def _valid_features(features: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """features [N, ...] with invalid rows replaced by the first valid one (valid: [N] bool)."""
  first = features[jnp.argmax(valid)]
  return jnp.where(valid.reshape(valid.shape + (1,) * (features.ndim - 1)), features, first)


def gaussian_lattice(height: int, width: int, sxy: float, valid: Optional[jnp.ndarray] = None) -> Lattice:
  """The position kernel's lattice of an H x W image, at gaussian_capacity (what dense_crf builds).

  A function of the size (and validity) alone: a caller that runs dense_crf
  on many images of one size can build it once and pass it as
  dense_crf(..., gaussian=...); nothing is cached here. Jit with height,
  width, sxy static. valid: optional [H, W] bool, as dense_crf's.
  """
  valid = jnp.ones(height * width, bool) if valid is None else jnp.reshape(valid, -1)
  features = _valid_features(flat_positions(height * width, width) / np.float32(sxy), valid)
  return gaussian_lattice_at(gaussian_points(features, sxy), gaussian_capacity(height, width, sxy))


def _on_grid(sxy: float) -> bool:
  """Whether the position kernel's lattice is a grid one (grid.py) rather than hashed."""
  return sxy >= grid_lib.MIN_SXY


def gaussian_points(features: jnp.ndarray, sxy: float, segment: Optional[jnp.ndarray] = None,
                    num_segments: int = 1):
  """The position kernel's capacity-independent lattice of features [N, 2] (positions / sxy): a grid
  lattice (grid.grid_points, no hashing) from sxy >= grid.MIN_SXY, else hashed (lattice.lattice_points)."""
  if _on_grid(sxy):
    return grid_lib.grid_points(features, segment, num_segments)
  return lattice_lib.lattice_points(features, segment)


def gaussian_lattice_at(points, capacity: int) -> Lattice:
  """The Lattice of gaussian_points at a static capacity."""
  if isinstance(points, grid_lib.GridPoints):
    return grid_lib.grid_lattice(points, capacity)
  return lattice_lib.lattice_at(points, capacity)


def num_points(points) -> jnp.ndarray:
  """[] int32: the capacity gaussian_points or lattice.lattice_points need."""
  return points.num_cells if isinstance(points, grid_lib.GridPoints) else points.table.num_unique


def gaussian_capacity(height: int, width: int, sxy: float) -> int:
  """Static bound on the Gaussian lattice of an H x W image (gaussian_points).

  On a grid (sxy >= grid.MIN_SXY): grid.grid_capacity. Hashed: about 2/sqrt(3)
  points per unit area plus 3 per unit of perimeter (measured on sizes 1x1 to
  520x520 and sxy 0.3-10, the perimeter term never exceeded 2.5), and 3
  (= d+1) points per pixel can never overflow.
  """
  if _on_grid(sxy):
    return grid_lib.grid_capacity(height, width, sxy)
  area = 2.0 / np.sqrt(3.0) * height * width / sxy ** 2
  return int(min(3 * height * width, np.ceil(area + 3.0 * ((height + width) / sxy + 2.0))))


def bilateral_features(image: jnp.ndarray, sxy: float, srgb: float) -> jnp.ndarray:
  """[H*W, 5] float32 features (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb). image: [H, W, 3] uint8."""
  height, width, _ = image.shape
  colour = image.reshape(-1, 3).astype(jnp.float32) / np.float32(srgb)
  return jnp.concatenate([gaussian_features(height, width, sxy), colour], axis=-1)


def bilateral_capacities(num_pixels: int) -> Tuple[int, ...]:
  """Descending static capacities dense_crf switches among for the bilateral lattice of num_pixels pixels:
  lattice.SWITCHED_RUNGS of the capacity ladder (photos need 0.01-0.12 points per pixel with the default
  parameters, 0.1-1.35 with VOC's)."""
  return lattice_lib.capacity_ladder(num_pixels, 5, lattice_lib.SWITCHED_RUNGS)


def symmetric_norm(lattice: Lattice, valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """[N, 1] float32: 1 / sqrt(K 1 + 1e-20), pydensecrf's NORMALIZE_SYMMETRIC.

  valid: optional [N] bool, the points that count: the others splat nothing and get norm 0,
  so that they take no part in any later filter either.
  """
  if valid is None:
    return jax.lax.rsqrt(lattice_filter(lattice, jnp.ones((lattice.offsets.shape[0], 1), jnp.float32)) + 1e-20)
  norm = jax.lax.rsqrt(lattice_filter(lattice, valid.astype(jnp.float32)[:, None]) + 1e-20)
  return jnp.where(valid[:, None], norm, 0.0)


# Up to this many labels, a softmax over unrolled columns is one vectorised loop: XLA's reduction over a
# short minor axis runs far slower (see the crf benchmark's history), and catches up at about 16 labels.
_UNROLLED_SOFTMAX_LABELS = 16


def label_softmax(logits: jnp.ndarray) -> jnp.ndarray:
  """Softmax over labels, as pydensecrf's expAndNormalize (max-shifted exp, divided by the sum). [N, L] -> [N, L]."""
  num_labels = logits.shape[-1]
  if num_labels > _UNROLLED_SOFTMAX_LABELS:
    return jax.nn.softmax(logits, axis=-1)
  top = functools.reduce(jnp.maximum, [logits[:, label] for label in range(num_labels)])
  exps = jnp.exp(logits - top[:, None])
  return exps / functools.reduce(jnp.add, [exps[:, label] for label in range(num_labels)])[:, None]


def mean_field(unary: jnp.ndarray, lattices, weights, iterations: int,
               valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Q = softmax(-U); then `iterations` times Q = softmax(-U + sum_k w_k n_k K_k(n_k Q)), n_k = symmetric_norm.

  Each step: normalise (n_k Q), filter (K_k), weigh by the Potts compatibility
  (w_k n_k), add to -U, softmax. With two labels each kernel filters one
  channel: q0 = 1 - q1, so K(n q0) = K(n) - K(n q1), with K(n) filtered once
  (results move at the 1e-7 level only); a filter is most of the work.

  Args:
    unary: [N, L] float32.
    lattices, weights: one per kernel (Lattice, Potts weight).
    iterations: static.
    valid: optional [N] bool, as symmetric_norm's.

  Returns:
    Q: [N, L] float32.
  """
  if not iterations:
    return label_softmax(-unary)
  norms = [symmetric_norm(lattice, valid) for lattice in lattices]
  if unary.shape[-1] != 2:
    def step(_, q):
      logits = -unary
      for lattice, norm, weight in zip(lattices, norms, weights):
        logits = logits + np.float32(weight) * norm * scaled_filter(lattice, q, norm)
      return label_softmax(logits)

    return jax.lax.fori_loop(0, iterations, step, label_softmax(-unary))

  filtered_norms = [lattice_filter(lattice, norm) for lattice, norm in zip(lattices, norms)]  # K(n)

  def two_label_step(_, difference):
    """The step above on d = logit1 - logit0 [N, 1], all that Q depends on (labels as columns)."""
    q1 = _two_label_softmax(difference)[1]
    logit0, logit1 = -unary[:, :1], -unary[:, 1:]
    for lattice, norm, filtered_norm, weight in zip(lattices, norms, filtered_norms, weights):
      filtered_fg = scaled_filter(lattice, q1, norm)
      message = np.float32(weight) * norm
      logit0 = logit0 + message * (filtered_norm - filtered_fg)
      logit1 = logit1 + message * filtered_fg
    return logit1 - logit0

  difference = jax.lax.fori_loop(0, iterations, two_label_step, unary[:, :1] - unary[:, 1:])
  return jnp.concatenate(_two_label_softmax(difference), axis=-1)


def _two_label_softmax(difference: jnp.ndarray):
  """(q0, q1) = label_softmax([logit0, logit1]) from difference = logit1 - logit0 [N, 1] (each [N, 1]):
  the larger logit's exp is exp(0) = 1, the other's exp(-|d|), each divided by their sum (to 1 ulp)."""
  other = jnp.exp(-jnp.abs(difference))
  total = 1.0 + other
  larger, smaller = 1.0 / total, other / total
  ahead = difference >= 0
  return jnp.where(ahead, smaller, larger), jnp.where(ahead, larger, smaller)


# Stand-in for infinite energies, so that no softmax sees inf - inf.
_HUGE_ENERGY = np.float32(1e30)


def _check_inputs(image, unary, iterations: int, sigmas) -> None:
  """Raises ValueError for inputs dense_crf cannot take; checks values only when they are concrete."""
  if unary.ndim != 3 or unary.shape[0] < 1 or unary.shape[1] < 1 or unary.shape[2] < 1:
    raise ValueError(f"dense_crf: unary must be [H, W, L] with H, W, L >= 1, got shape {unary.shape}.")
  if image.shape != unary.shape[:2] + (3,):
    raise ValueError(f"dense_crf: image must be [H, W, 3] = {unary.shape[:2] + (3,)} to match unary "
                     f"{unary.shape}, got image shape {image.shape}.")
  if image.dtype != jnp.uint8:
    raise ValueError(f"dense_crf: image must be uint8 (as pydensecrf's rgbim), got {image.dtype}.")
  if iterations < 0:
    raise ValueError(f"dense_crf: iterations must be >= 0, got {iterations}.")
  for name, sigma in sigmas.items():
    if not sigma > 0:
      raise ValueError(f"dense_crf: {name} must be > 0, got {sigma}.")
  if not isinstance(unary, jax.core.Tracer):
    values = np.asarray(unary)
    bad = np.isnan(values) | np.isneginf(values)
    if bad.any():
      raise ValueError(f"dense_crf: unary has {int(bad.sum())} NaN or -inf values (first at [H, W, L] index "
                       f"{tuple(int(i) for i in np.argwhere(bad)[0])}); energies must be finite or +inf.")


class KernelPoints(NamedTuple):
  """The capacity-independent lattice points of both kernels of one image: gaussian_points (grid.GridPoints
  or lattice.LatticePoints) and lattice.lattice_points."""
  gaussian: "grid_lib.GridPoints | lattice_lib.LatticePoints"
  bilateral: lattice_lib.LatticePoints


def kernel_points(pixels: jnp.ndarray, valid: jnp.ndarray, position: jnp.ndarray, *, gaussian_sxy: float,
                  bilateral_sxy: float, bilateral_srgb: float, segment: Optional[jnp.ndarray] = None,
                  num_segments: int = 1) -> KernelPoints:
  """Lattice points of a flat image's two kernels; num_points of each tells the capacity it needs.

  Args: as crf_features (pixels [N, 3] uint8, valid [N] bool, position [N, 2] float32), and
    segment: optional [N] int32 image of each pixel, in [0, num_segments) (static), when several
      images share the arrays: each is then its own CRF (lattice.lattice_points); invalid pixels
      join the first valid one's image.
  """
  gaussian, bilateral = crf_features(pixels, valid, position, gaussian_sxy=gaussian_sxy,
                                     bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb)
  if segment is not None:
    segment = _valid_features(segment, valid)
  return KernelPoints(gaussian_points(gaussian, gaussian_sxy, segment, num_segments),
                      lattice_lib.lattice_points(bilateral, segment))


class _Kernels(NamedTuple):
  """Static description of the two kernels (hashable: a custom_vjp non-differentiable argument)."""
  gaussian_weight: float
  bilateral_weight: float
  gaussian_capacity: int
  bilateral_capacities: Tuple[int, ...]
  iterations: int


def _mean_field_at(kernels: _Kernels, rung: int, gaussian: Lattice, bilateral: lattice_lib.LatticePoints,
                   valid: jnp.ndarray, energies: jnp.ndarray) -> jnp.ndarray:
  """Mean field with the bilateral lattice built at capacity `rung`. energies: [N, L] -> Q [N, L]."""
  bilateral = lattice_lib.lattice_at(bilateral, rung)
  return mean_field(energies, (gaussian, bilateral), (kernels.gaussian_weight, kernels.bilateral_weight),
                    kernels.iterations, valid)


def _backward_at(kernels, rung, gaussian, bilateral, valid, energies, cotangent):
  _, vjp = jax.vjp(functools.partial(_mean_field_at, kernels, rung, gaussian, bilateral, valid), energies)
  return vjp(cotangent)[0]


# The whole inference runs at one capacity rung, so the bilateral neighbour
# table is built at that size (not at N*(d+1)) and no filter switches again.
# The Gaussian lattice is built once, outside the rungs: inside, each rung compiled its own search.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inference(kernels: _Kernels, gaussian: Lattice, bilateral: lattice_lib.LatticePoints, valid: jnp.ndarray,
               energies: jnp.ndarray) -> jnp.ndarray:
  forward = lattice_lib.on_rung(kernels.bilateral_capacities, functools.partial(_mean_field_at, kernels))
  return forward(bilateral.table.num_unique, gaussian, bilateral, valid, energies)


def _inference_fwd(kernels, gaussian, bilateral, valid, energies):
  return _inference(kernels, gaussian, bilateral, valid, energies), (gaussian, bilateral, valid, energies)


def _inference_bwd(kernels, residuals, cotangent):
  gaussian, bilateral, valid, energies = residuals
  backward = lattice_lib.on_rung(kernels.bilateral_capacities, functools.partial(_backward_at, kernels))
  return None, None, None, backward(bilateral.table.num_unique, gaussian, bilateral, valid, energies, cotangent)


_inference.defvjp(_inference_fwd, _inference_bwd)


def crf_marginals(points: KernelPoints, energies: jnp.ndarray, valid: jnp.ndarray, *, iterations: int,
                  gaussian_weight: float, bilateral_weight: float, gaussian_capacity: int,
                  bilateral_capacities: Tuple[int, ...], gaussian: Optional[Lattice] = None) -> jnp.ndarray:
  """Mean-field marginals of a flat image from its kernel points (the second half of dense_crf).

  Args:
    points: kernel_points of the image.
    energies: [N, L] float32, finite (or 1e30 for impossible labels).
    valid: [N] bool; invalid pixels take no part and their rows are meaningless.
    iterations, gaussian_weight, bilateral_weight: as dense_crf.
    gaussian_capacity: static, >= points.gaussian's point count (else the result is NaN).
    bilateral_capacities: static descending rungs; the inference runs at the smallest that holds
      the bilateral lattice (one rung: a single program; NaN if it overflows).
    gaussian: optional prebuilt Gaussian lattice (gaussian_lattice), used instead of
      points.gaussian (which may then be None) and gaussian_capacity.

  Returns:
    Q: [N, L] float32.
  """
  kernels = _Kernels(float(gaussian_weight), float(bilateral_weight), int(gaussian_capacity),
                     tuple(int(c) for c in bilateral_capacities), int(iterations))
  if gaussian is None:
    gaussian = gaussian_lattice_at(points.gaussian, kernels.gaussian_capacity)
  return _inference(kernels, gaussian, points.bilateral, valid, energies)


def dense_crf(image: jnp.ndarray, unary: jnp.ndarray, *, valid: Optional[jnp.ndarray] = None,
              iterations: int = 10, gaussian_sxy: float = 3.0, gaussian_weight: float = 3.0,
              bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0,
              bilateral_weight: float = 10.0, gaussian: Optional[Lattice] = None) -> jnp.ndarray:
  """Marginals of a dense CRF with a Gaussian and a bilateral Potts kernel, as pydensecrf computes them.

  Equivalent to pydensecrf's DenseCRF2D(W, H, L) with setUnaryEnergy(U),
  addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_weight),
  addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image,
  compat=bilateral_weight) and inference(iterations): Q = softmax(-U), then
  each iteration Q = softmax(-U + sum_k w_k n_k K_k(n_k Q)), K_k permutohedral
  Gaussian filters, n_k = 1 / sqrt(K_k 1) (symmetric normalisation).

  Jit it with the keyword arguments static (they are Python numbers, e.g.
  jax.jit(functools.partial(dense_crf, iterations=5))); image and unary are
  the traced arguments, and each (H, W, L) compiles once. It is vmappable
  over equal-sized images (one lattice capacity serves the whole batch) and
  differentiable with respect to unary.

  Args:
    image: [H, W, 3] uint8.
    unary: [H, W, L] float32 energies (negative log-probabilities). +inf
      (zero probability) is allowed. NaN or -inf raise ValueError when unary
      is concrete; under jit they cannot be checked, and count as +inf and
      -1e30 respectively, so the result stays finite.
    valid: optional [H, W] bool, default all True. Invalid (e.g. padding)
      pixels take no part: they splat nothing into either lattice, are out of
      the normalisation, and their rows of Q are meaningless. On the valid
      region Q is that of the CRF of the valid pixels alone at their (x, y),
      e.g. of the unpadded image when the padding is at the bottom/right.
    iterations: number of mean-field steps (0 gives softmax(-unary)).
    gaussian_sxy, gaussian_weight: position kernel's standard deviation in
      pixels and Potts weight.
    bilateral_sxy, bilateral_srgb, bilateral_weight: appearance kernel's
      standard deviations in pixels and in colour levels, and Potts weight.
    gaussian: optional gaussian_lattice(H, W, gaussian_sxy, valid), built
      once by a caller that refines many images of one size (it is then not
      rebuilt per call); default: built here.

  Returns:
    Q: [H, W, L] float32 marginals. With L = 1, Q is all ones.

  Raises:
    ValueError: on mismatched shapes, a non-uint8 image, non-positive
      standard deviations, negative iterations or (concrete) NaN/-inf energies.
  """
  _check_inputs(image, unary, iterations, {"gaussian_sxy": gaussian_sxy, "bilateral_sxy": bilateral_sxy,
                                           "bilateral_srgb": bilateral_srgb})
  height, width, num_labels = unary.shape
  if valid is None:
    valid = jnp.ones((height, width), bool)
  elif valid.shape != (height, width) or valid.dtype != jnp.bool_:
    raise ValueError(f"dense_crf: valid must be [H, W] = {(height, width)} bool, got {valid.dtype} {valid.shape}.")
  energies = jnp.nan_to_num(unary.astype(jnp.float32), nan=_HUGE_ENERGY, posinf=_HUGE_ENERGY,
                            neginf=-_HUGE_ENERGY)
  if gaussian is not None and gaussian.offsets.shape != (height * width, 3):
    raise ValueError(f"dense_crf: gaussian must be gaussian_lattice({height}, {width}, ...), got a lattice of "
                     f"offsets {gaussian.offsets.shape}.")
  position = flat_positions(height * width, width)
  if gaussian is None:
    points = kernel_points(image.reshape(-1, 3), valid.reshape(-1), position, gaussian_sxy=gaussian_sxy,
                           bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb)
  else:
    _, bilateral = crf_features(image.reshape(-1, 3), valid.reshape(-1), position, gaussian_sxy=gaussian_sxy,
                                bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb)
    points = KernelPoints(None, lattice_lib.lattice_points(bilateral))
  q = crf_marginals(points, energies.reshape(-1, num_labels), valid.reshape(-1), iterations=iterations,
                    gaussian_weight=gaussian_weight, bilateral_weight=bilateral_weight,
                    gaussian_capacity=gaussian_capacity(height, width, gaussian_sxy),
                    bilateral_capacities=bilateral_capacities(height * width), gaussian=gaussian)
  return q.reshape(height, width, num_labels)

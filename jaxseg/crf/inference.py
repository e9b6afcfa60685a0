"""Mean-field inference in a fully connected CRF, as pydensecrf's DenseCRF2D computes it."""

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import lattice as lattice_lib
from jaxseg.crf.lattice import Lattice, build_lattice, compact, lattice_filter


def gaussian_features(height: int, width: int, sxy: float) -> np.ndarray:
  """[H*W, 2] float32 features (x / sxy, y / sxy), row-major pixels."""
  y, x = np.mgrid[:height, :width].astype(np.float32)
  return np.stack([x, y], axis=-1).reshape(-1, 2) / np.float32(sxy)


def _bucket(size: int) -> int:
  """Smallest of 2^k and 3 * 2^(k-1) that is >= size: few distinct shapes to compile for."""
  power = 1 << max(0, size - 1).bit_length()
  return power * 3 // 4 if power >= 4 and power * 3 // 4 >= size else power


@jax.jit
def _padded_gaussian_kernel(features: jnp.ndarray, valid: jnp.ndarray) -> Tuple[Lattice, jnp.ndarray]:
  lattice = build_lattice(features)
  return lattice, symmetric_norm(lattice, valid)


@functools.lru_cache(maxsize=16)
def gaussian_kernel(height: int, width: int, sxy: float) -> Tuple[Lattice, np.ndarray]:
  """The position-only lattice and its symmetric norm [N, 1].

  Both are functions of static sizes: built once per shape, compacted to M
  lattice points, and passed to the inference as constants. The build is
  compiled per bucket of sizes, not per shape: points are padded with copies
  of the first one, which add no lattice point and are masked out of the norm.
  """
  features = gaussian_features(height, width, sxy)
  num_inputs = features.shape[0]
  padding = np.repeat(features[:1], _bucket(num_inputs) - num_inputs, axis=0)
  valid = np.arange(num_inputs + len(padding)) < num_inputs
  with jax.ensure_compile_time_eval():  # concrete arrays even when first called under jit
    lattice, norm = _padded_gaussian_kernel(np.concatenate([features, padding]), valid)
    return compact(lattice, num_inputs), np.asarray(norm)[:num_inputs]


def bilateral_features(image: jnp.ndarray, sxy: float, srgb: float) -> jnp.ndarray:
  """[H*W, 5] float32 features (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb). image: [H, W, 3] uint8."""
  height, width, _ = image.shape
  colour = image.reshape(-1, 3).astype(jnp.float32) / np.float32(srgb)
  return jnp.concatenate([gaussian_features(height, width, sxy), colour], axis=-1)


# Bilateral lattice points per pixel measured on photographs: 0.01-0.12 with the default
# parameters, 0.1-1.12 with VOC's. The blur's cost follows the rung, so rungs are dense
# there; 6 (= d+1) can never overflow. Each rung compiles its own copy of the inference.
_BILATERAL_RUNGS_PER_PIXEL = (6.0, 1.5, 1.0, 0.5, 0.125)


def bilateral_capacities(num_pixels: int) -> Tuple[int, ...]:
  """Descending static capacities of the bilateral lattice of an image of num_pixels pixels."""
  rungs = sorted({max(1, int(np.ceil(num_pixels * per_pixel))) for per_pixel in _BILATERAL_RUNGS_PER_PIXEL})
  return tuple(reversed(rungs))


def symmetric_norm(lattice: Lattice, valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """[N, 1] float32: 1 / sqrt(K 1 + 1e-20), pydensecrf's NORMALIZE_SYMMETRIC.

  valid: optional [N] bool, the points that count (the others splat nothing).
  """
  num_inputs = lattice.offsets.shape[0]
  ones = jnp.ones((num_inputs, 1), jnp.float32) if valid is None else valid.astype(jnp.float32)[:, None]
  return jax.lax.rsqrt(lattice_filter(lattice, ones) + 1e-20)


# Up to this many labels, a softmax over unrolled columns is one vectorised loop; XLA's
# reduction over a short minor axis was 10x slower at 2 labels, and faster from about 16.
_UNROLLED_SOFTMAX_LABELS = 16


def label_softmax(logits: jnp.ndarray) -> jnp.ndarray:
  """Softmax over labels, as pydensecrf's expAndNormalize (max-shifted exp, divided by the sum). [N, L] -> [N, L]."""
  num_labels = logits.shape[-1]
  if num_labels > _UNROLLED_SOFTMAX_LABELS:
    return jax.nn.softmax(logits, axis=-1)
  top = functools.reduce(jnp.maximum, [logits[:, label] for label in range(num_labels)])
  exps = jnp.exp(logits - top[:, None])
  return exps / functools.reduce(jnp.add, [exps[:, label] for label in range(num_labels)])[:, None]


def mean_field(unary: jnp.ndarray, lattices, norms, weights, iterations: int) -> jnp.ndarray:
  """Q = softmax(-U); then `iterations` times Q = softmax(-U + sum_k w_k n_k K_k(n_k Q)).

  Args:
    unary: [N, L] float32.
    lattices, norms, weights: one per kernel (Lattice, [N, 1] float32, Potts weight).
    iterations: static.

  Returns:
    Q: [N, L] float32.
  """
  def step(_, q):
    logits = -unary
    for lattice, norm, weight in zip(lattices, norms, weights):
      logits = logits + np.float32(weight) * norm * lattice_filter(lattice, norm * q)
    return label_softmax(logits)

  return jax.lax.fori_loop(0, iterations, step, label_softmax(-unary))


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


class _Kernels(NamedTuple):
  """Static description of the two kernels (hashable: a custom_vjp non-differentiable argument)."""
  gaussian_weight: float
  bilateral_weight: float
  bilateral_capacities: Tuple[int, ...]
  iterations: int


def _mean_field_at(kernels: _Kernels, rung: int, gaussian: Lattice, gaussian_norm: jnp.ndarray,
                   points: lattice_lib.LatticePoints, energies: jnp.ndarray) -> jnp.ndarray:
  """Mean field with the bilateral lattice built at capacity `rung`. energies: [N, L] -> Q [N, L]."""
  bilateral = lattice_lib.lattice_at(points, rung)
  return mean_field(energies, (gaussian, bilateral), (gaussian_norm, symmetric_norm(bilateral)),
                    (kernels.gaussian_weight, kernels.bilateral_weight), kernels.iterations)


def _backward_at(kernels, rung, gaussian, gaussian_norm, points, energies, cotangent):
  _, vjp = jax.vjp(functools.partial(_mean_field_at, kernels, rung, gaussian, gaussian_norm, points), energies)
  return vjp(cotangent)[0]


# The whole inference runs at one capacity rung, so the bilateral neighbour
# table is built at that size (not at N*(d+1)) and no filter switches again.
# The Gaussian kernel enters as operands: closed over, each rung would embed its own copy.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inference(kernels: _Kernels, gaussian: Lattice, gaussian_norm: jnp.ndarray,
               points: lattice_lib.LatticePoints, energies: jnp.ndarray) -> jnp.ndarray:
  forward = lattice_lib.on_rung(kernels.bilateral_capacities, functools.partial(_mean_field_at, kernels))
  return forward(points.table.num_unique, gaussian, gaussian_norm, points, energies)


def _inference_fwd(kernels, gaussian, gaussian_norm, points, energies):
  return _inference(kernels, gaussian, gaussian_norm, points, energies), (gaussian, gaussian_norm, points, energies)


def _inference_bwd(kernels, residuals, cotangent):
  gaussian, gaussian_norm, points, energies = residuals
  backward = lattice_lib.on_rung(kernels.bilateral_capacities, functools.partial(_backward_at, kernels))
  return None, None, None, backward(points.table.num_unique, gaussian, gaussian_norm, points, energies, cotangent)


_inference.defvjp(_inference_fwd, _inference_bwd)


def dense_crf(image: jnp.ndarray, unary: jnp.ndarray, *, iterations: int = 10,
              gaussian_sxy: float = 3.0, gaussian_weight: float = 3.0,
              bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0,
              bilateral_weight: float = 10.0) -> jnp.ndarray:
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
    iterations: number of mean-field steps (0 gives softmax(-unary)).
    gaussian_sxy, gaussian_weight: position kernel's standard deviation in
      pixels and Potts weight.
    bilateral_sxy, bilateral_srgb, bilateral_weight: appearance kernel's
      standard deviations in pixels and in colour levels, and Potts weight.

  Returns:
    Q: [H, W, L] float32 marginals. With L = 1, Q is all ones.

  Raises:
    ValueError: on mismatched shapes, a non-uint8 image, non-positive
      standard deviations, negative iterations or (concrete) NaN/-inf energies.
  """
  _check_inputs(image, unary, iterations, {"gaussian_sxy": gaussian_sxy, "bilateral_sxy": bilateral_sxy,
                                           "bilateral_srgb": bilateral_srgb})
  height, width, num_labels = unary.shape
  energies = jnp.nan_to_num(unary.astype(jnp.float32), nan=_HUGE_ENERGY, posinf=_HUGE_ENERGY,
                            neginf=-_HUGE_ENERGY)
  points = lattice_lib.lattice_points(bilateral_features(image, bilateral_sxy, bilateral_srgb))
  capacities = bilateral_capacities(height * width)
  kernels = _Kernels(float(gaussian_weight), float(bilateral_weight), capacities, iterations)
  gaussian, gaussian_norm = gaussian_kernel(height, width, float(gaussian_sxy))
  q = _inference(kernels, gaussian, jnp.asarray(gaussian_norm), points, energies.reshape(-1, num_labels))
  return q.reshape(height, width, num_labels)

"""Mean-field inference in a fully connected CRF, as pydensecrf's DenseCRF2D computes it."""

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.crf import lattice as lattice_lib
from jaxseg.crf.lattice import Lattice, build_lattice, compact, lattice_filter


def gaussian_features(height: int, width: int, sxy: float) -> jnp.ndarray:
  """[H*W, 2] float32 features (x / sxy, y / sxy), row-major pixels."""
  y, x = np.mgrid[:height, :width].astype(np.float32)
  return jnp.asarray(np.stack([x, y], axis=-1).reshape(-1, 2) / np.float32(sxy))


@functools.lru_cache(maxsize=16)
def gaussian_kernel(height: int, width: int, sxy: float) -> Tuple[Lattice, np.ndarray]:
  """The position-only lattice and its symmetric norm [N, 1].

  Both are functions of static sizes: built once per shape, compacted to M
  lattice points, and embedded as constants.
  """
  with jax.ensure_compile_time_eval():
    lattice = compact(jax.jit(build_lattice)(gaussian_features(height, width, sxy)))
    return lattice, np.asarray(jax.jit(symmetric_norm)(lattice))


def bilateral_features(image: jnp.ndarray, sxy: float, srgb: float) -> jnp.ndarray:
  """[H*W, 5] float32 features (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb). image: [H, W, 3] uint8."""
  height, width, _ = image.shape
  colour = image.reshape(-1, 3).astype(jnp.float32) / np.float32(srgb)
  return jnp.concatenate([gaussian_features(height, width, sxy), colour], axis=-1)


def symmetric_norm(lattice: Lattice) -> jnp.ndarray:
  """[N, 1] float32: 1 / sqrt(K 1 + 1e-20), pydensecrf's NORMALIZE_SYMMETRIC."""
  num_inputs = lattice.offsets.shape[0]
  return jax.lax.rsqrt(lattice_filter(lattice, jnp.ones((num_inputs, 1), jnp.float32)) + 1e-20)


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
    return jax.nn.softmax(logits, axis=-1)

  return jax.lax.fori_loop(0, iterations, step, jax.nn.softmax(-unary, axis=-1))


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
  height: int
  width: int
  gaussian_sxy: float
  gaussian_weight: float
  bilateral_weight: float
  bilateral_capacities: Tuple[int, ...]
  iterations: int


def _mean_field_at(kernels: _Kernels, rung: int, points: lattice_lib.LatticePoints,
                   energies: jnp.ndarray) -> jnp.ndarray:
  """Mean field with the bilateral lattice built at capacity `rung`. energies: [N, L] -> Q [N, L]."""
  gaussian, gaussian_norm = gaussian_kernel(kernels.height, kernels.width, kernels.gaussian_sxy)
  bilateral = lattice_lib.lattice_at(points, rung)
  return mean_field(energies, (gaussian, bilateral), (jnp.asarray(gaussian_norm), symmetric_norm(bilateral)),
                    (kernels.gaussian_weight, kernels.bilateral_weight), kernels.iterations)


def _forward_at(kernels, rung, active, points, energies):
  del active
  return _mean_field_at(kernels, rung, points, energies)


def _backward_at(kernels, rung, active, points, energies, cotangent):
  del active
  _, vjp = jax.vjp(functools.partial(_mean_field_at, kernels, rung, points), energies)
  return vjp(cotangent)[0]


# The whole inference runs at one capacity rung, so the bilateral neighbour
# table is built at that size (not at N*(d+1)) and no filter switches again.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _inference(kernels: _Kernels, points: lattice_lib.LatticePoints, energies: jnp.ndarray) -> jnp.ndarray:
  forward = lattice_lib.on_rung(kernels.bilateral_capacities, functools.partial(_forward_at, kernels))
  return forward(points.table.num_unique, points, energies)


def _inference_fwd(kernels, points, energies):
  return _inference(kernels, points, energies), (points, energies)


def _inference_bwd(kernels, residuals, cotangent):
  points, energies = residuals
  backward = lattice_lib.on_rung(kernels.bilateral_capacities, functools.partial(_backward_at, kernels))
  return None, backward(points.table.num_unique, points, energies, cotangent)


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
  capacities = lattice_lib.capacity_ladder(lattice_lib.max_points(height * width, 5))
  kernels = _Kernels(height, width, float(gaussian_sxy), float(gaussian_weight), float(bilateral_weight),
                     capacities, iterations)
  q = _inference(kernels, points, energies.reshape(-1, num_labels))
  return q.reshape(height, width, num_labels)

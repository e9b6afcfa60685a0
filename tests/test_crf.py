"""jaxseg.crf against pydensecrf, a brute-force Gaussian filter and finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from jaxseg.crf import build_lattice, dense_crf, lattice_filter
from jaxseg.crf import grid
from jaxseg.crf import hash_table
from jaxseg.crf import inference
from jaxseg.crf import lattice as lattice_lib

pytest.importorskip("pydensecrf.densecrf")
from experiments.benchmarks.crf import PARAMS, reference_crf  # noqa: E402

DEFAULT, VOC = PARAMS["default"], PARAMS["voc"]
# One jitted function per parameter set: each (H, W, L) compiles once for the whole file.
CRFS = {name: jax.jit(functools.partial(dense_crf, iterations=10, **params)) for name, params in PARAMS.items()}
build = jax.jit(build_lattice)
apply_filter = jax.jit(lattice_filter)


@functools.lru_cache(maxsize=None)
def photo(name: str, scale: float) -> np.ndarray:
  image = getattr(skimage.data, name)()
  if scale != 1.0:
    image = skimage.transform.rescale(image, scale, channel_axis=-1, anti_aliasing=True)
    image = (image * 255).round().astype(np.uint8)
  return np.ascontiguousarray(image)


def make_unary(shape, num_labels: int, kind: str, seed: int = 0) -> np.ndarray:
  """Energies from smooth blobs of probability (kind 'smooth') or the same plus strong pixel noise ('noisy')."""
  rng = np.random.default_rng(seed)
  height, width = shape
  coarse = rng.normal(size=(height // 24 + 2, width // 24 + 2, num_labels)) * 2.0
  logits = skimage.transform.resize(coarse, (height, width, num_labels), order=1)
  if kind == "noisy":
    logits = logits + rng.normal(size=logits.shape) * 1.5
  log_prob = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return (-log_prob).astype(np.float32)


def assert_matches_reference(image, unary, params_name):
  q = np.asarray(CRFS[params_name](jnp.asarray(image), jnp.asarray(unary)))
  q_ref = reference_crf(image, unary, **PARAMS[params_name])
  agreement = np.mean(q.argmax(-1) == q_ref.argmax(-1))
  mean_abs = np.abs(q - q_ref).mean()
  assert np.isfinite(q).all()
  assert agreement >= 0.995, agreement
  assert mean_abs <= 0.01, mean_abs
  # Same arithmetic as the reference up to float32 summation order: far tighter than the contract.
  assert mean_abs <= 1e-4, mean_abs


@pytest.mark.parametrize("params_name", ["default", "voc"])
@pytest.mark.parametrize("kind", ["smooth", "noisy"])
@pytest.mark.parametrize("num_labels", [2, 5, 21])
def test_matches_pydensecrf_on_small_photo(num_labels, kind, params_name):
  image = photo("chelsea", 0.5)  # 150 x 226
  assert_matches_reference(image, make_unary(image.shape[:2], num_labels, kind), params_name)


@pytest.mark.slow
@pytest.mark.parametrize("name, num_labels, kind, params_name", [
    ("chelsea", 2, "smooth", "voc"),  # full size, 300 x 451
    ("coffee", 21, "noisy", "default"),  # 400 x 600
])
def test_matches_pydensecrf_on_full_size_photo(name, num_labels, kind, params_name):
  image = photo(name, 1.0)
  assert_matches_reference(image, make_unary(image.shape[:2], num_labels, kind, seed=1), params_name)


@pytest.mark.parametrize("gaussian_sxy", [0.5, grid.MIN_SXY])
def test_position_kernel_hashed_below_and_on_a_grid_from_min_sxy_matches_pydensecrf(gaussian_sxy):
  image = photo("chelsea", 0.25)  # 75 x 113
  unary = make_unary(image.shape[:2], 3, "noisy")
  params = dict(VOC, gaussian_sxy=gaussian_sxy)
  q = np.asarray(jax.jit(functools.partial(dense_crf, iterations=10, **params))(image, unary))
  q_ref = reference_crf(image, unary, **params)
  assert np.mean(q.argmax(-1) == q_ref.argmax(-1)) >= 0.995 and np.abs(q - q_ref).mean() <= 1e-4


@pytest.mark.parametrize("height, width, num_labels", [(1, 1, 2), (1, 7, 3), (6, 5, 4)])
def test_tiny_images_match_pydensecrf(height, width, num_labels):
  rng = np.random.default_rng(height * 10 + width)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  unary = (rng.random((height, width, num_labels)) * 3).astype(np.float32)
  np.testing.assert_allclose(CRFS["default"](image, unary), reference_crf(image, unary, **DEFAULT), atol=1e-5)


def test_single_label_gives_ones():
  image = photo("chelsea", 0.1)
  unary = np.random.default_rng(0).random(image.shape[:2] + (1,)).astype(np.float32)
  np.testing.assert_array_equal(CRFS["default"](image, unary), np.ones(unary.shape, np.float32))


def test_infinite_energy_means_zero_probability():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  unary = rng.random((6, 5, 3)).astype(np.float32)
  unary[0, 0, 1] = unary[2, 3, 0] = np.inf
  q = np.asarray(CRFS["default"](image, unary))
  np.testing.assert_allclose(q, reference_crf(image, unary, **DEFAULT), atol=1e-6)
  # A pixel with no possible label: pydensecrf gives NaN, jaxseg a uniform distribution.
  unary[4, 4, :] = np.inf
  q = np.asarray(CRFS["default"](image, unary))
  assert np.isfinite(q).all()
  np.testing.assert_allclose(q[4, 4], np.full(3, 1 / 3), atol=1e-6)


def test_nan_energies_raise_eagerly_and_count_as_infinite_under_jit():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  unary = rng.random((6, 5, 4)).astype(np.float32)
  with_nan, with_inf = unary.copy(), unary.copy()
  with_nan[1, 2, 0], with_inf[1, 2, 0] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"NaN or -inf.*\(1, 2, 0\)"):
    dense_crf(image, with_nan)
  with_neg_inf = unary.copy()
  with_neg_inf[0, 0, 0] = -np.inf
  with pytest.raises(ValueError, match="NaN or -inf"):
    dense_crf(image, with_neg_inf)
  jitted = CRFS["default"]
  np.testing.assert_allclose(jitted(image, with_nan), jitted(image, with_inf), atol=1e-6)
  assert np.isfinite(np.asarray(jitted(image, with_neg_inf))).all()


@pytest.mark.parametrize("image_shape, unary_shape, dtype, match", [
    ((6, 5, 3), (6, 4, 2), np.uint8, "to match unary"),
    ((6, 5), (6, 5, 2), np.uint8, "to match unary"),
    ((6, 5, 3), (6, 5), np.uint8, r"\[H, W, L\]"),
    ((0, 5, 3), (0, 5, 2), np.uint8, "H, W, L >= 1"),
    ((6, 5, 3), (6, 5, 2), np.float32, "uint8"),
])
def test_bad_shapes_and_dtypes_raise(image_shape, unary_shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    dense_crf(np.zeros(image_shape, dtype), np.zeros(unary_shape, np.float32))


def test_bad_parameters_raise():
  image, unary = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.float32)
  with pytest.raises(ValueError, match="bilateral_srgb"):
    dense_crf(image, unary, bilateral_srgb=0.0)
  with pytest.raises(ValueError, match="iterations"):
    dense_crf(image, unary, iterations=-1)


def test_vmap_over_images_matches_one_by_one():
  images = np.stack([photo("chelsea", 0.1), photo("chelsea", 0.1)[::-1]])
  unaries = np.stack([make_unary(images.shape[1:3], 3, "noisy", seed=s) for s in range(2)])
  crf = jax.jit(functools.partial(dense_crf, iterations=5, **VOC))
  batched = np.asarray(jax.vmap(crf)(images, unaries))
  for i in range(2):
    np.testing.assert_allclose(batched[i], crf(images[i], unaries[i]), atol=3e-5)
    np.testing.assert_allclose(batched[i], reference_crf(images[i], unaries[i], 5, **VOC), atol=1e-4)
  # One image, several unaries: the lattices are shared, not batched.
  shared = np.asarray(jax.vmap(crf, in_axes=(None, 0))(images[0], unaries))
  np.testing.assert_allclose(shared[1], crf(images[0], unaries[1]), atol=3e-5)


def test_vmap_runs_images_of_different_rungs_at_the_largest():
  # A flat image has a handful of bilateral lattice points, noise many: alone they run at
  # different capacity rungs, batched both run at the noise's; the results do not change.
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
  images = np.stack([np.full_like(noise, 90), noise])
  unaries = np.stack([make_unary(noise.shape[:2], 3, "noisy", seed=s) for s in range(2)])
  crf = jax.jit(functools.partial(dense_crf, iterations=5, **VOC))
  points = [jax.jit(lattice_lib.lattice_points)(inference.bilateral_features(image, 67.0, 3.0)) for image in images]
  capacities = inference.bilateral_capacities(24 * 30)
  rungs = [lattice_lib._rung(p.table.num_unique, capacities) for p in points]
  assert int(rungs[0]) > int(rungs[1])  # a later (smaller) rung for the flat image
  batched = np.asarray(jax.vmap(crf)(images, unaries))
  for i in range(2):
    np.testing.assert_allclose(batched[i], reference_crf(images[i], unaries[i], 5, **VOC), atol=1e-4)
    np.testing.assert_allclose(batched[i], crf(images[i], unaries[i]), atol=3e-5)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  image = photo("coffee", 0.03)  # 12 x 18
  unary = make_unary(image.shape[:2], 3, "noisy")
  weights = rng.normal(size=unary.shape).astype(np.float32)

  @jax.jit
  def loss(u):
    return jnp.sum(dense_crf(image, u, iterations=3, **VOC) * weights)

  grad = np.asarray(jax.grad(loss)(jnp.asarray(unary)))
  assert np.isfinite(grad).all()
  eps = 1e-2
  for index in [tuple(rng.integers(0, s) for s in unary.shape) for _ in range(6)]:
    plus, minus = unary.copy(), unary.copy()
    plus[index] += eps
    minus[index] -= eps
    numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
    np.testing.assert_allclose(grad[index], numeric, rtol=3e-2, atol=2e-3)


def test_filter_vjp_is_the_transpose_of_the_filter():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.random((200, 5)) * 4, jnp.float32)
  lattice = build(features)
  cotangent = jnp.asarray(rng.random((200, 3)), jnp.float32)
  # The filter is linear: its matrix, column j the filter of the j-th unit vector.
  matrix = np.asarray(apply_filter(lattice, jnp.eye(200, dtype=jnp.float32)))
  assert not np.allclose(matrix, matrix.T, rtol=1e-3)  # the blur order makes it non-symmetric
  _, vjp = jax.vjp(lambda v: lattice_filter(lattice, v), jnp.zeros((200, 3), jnp.float32))
  np.testing.assert_allclose(vjp(cotangent)[0], matrix.T @ np.asarray(cotangent), rtol=1e-5, atol=1e-5)


# Permutohedral approximation of sum_j exp(-|f_i - f_j|^2 / 2) v_j on 300 points spread over 3 sigma
# per axis (measured on several seeds): the unnormalised output is scaled by a data-dependent factor
# (about 0.8-0.9 in 2-D, 0.4-0.8 in 5-D, lower where lattice points are sparse); normalised by the
# filtered ones (what the CRF's symmetric normalisation sees) it is within a few percent.
@pytest.mark.parametrize("dim, scale_range, norm_mean, norm_max", [
    (2, (0.75, 0.95), 0.006, 0.03),
    (5, (0.35, 0.85), 0.015, 0.08),
])
def test_lattice_filter_approximates_brute_force_gaussian(dim, scale_range, norm_mean, norm_max):
  rng = np.random.default_rng(dim)
  features = (rng.random((300, dim)) * 3).astype(np.float32)
  values = (rng.random((300, 2)) + 0.1).astype(np.float32)
  lattice = build(jnp.asarray(features))
  filtered = np.asarray(apply_filter(lattice, jnp.asarray(values)))
  filtered_ones = np.asarray(apply_filter(lattice, jnp.ones((300, 1), jnp.float32)))
  kernel = np.exp(-0.5 * ((features[:, None] - features[None]) ** 2).sum(-1))
  exact, exact_ones = kernel @ values, kernel.sum(1, keepdims=True)
  scale = filtered / exact
  assert scale_range[0] <= scale.min() and scale.max() <= scale_range[1], (scale.min(), scale.max())
  assert np.corrcoef(filtered.ravel(), exact.ravel())[0, 1] >= 0.98
  normalised_error = np.abs(filtered / filtered_ones - exact / exact_ones) / (exact / exact_ones)
  assert normalised_error.mean() <= norm_mean and normalised_error.max() <= norm_max


def test_lattice_capacity_overflow_is_nan_not_silent():
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.random((100, 3)) * 20, jnp.float32)
  full = build(features)
  assert int(full.num_points) > 10
  small = jax.jit(functools.partial(build_lattice, capacity=10))(features)
  assert int(small.num_points) == int(full.num_points)
  assert np.isnan(np.asarray(apply_filter(small, jnp.ones((100, 1))))).all()
  with pytest.raises(ValueError, match="capacity"):
    build_lattice(features, capacity=10)


def test_lattice_matches_across_capacity_rungs():
  # The same points filtered at the full capacity and at a small rung agree exactly.
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.random((3000, 2)) * 5, jnp.float32)
  values = jnp.asarray(rng.random((3000, 2)), jnp.float32)
  lattice = build(features)
  assert len(lattice.capacities) > 1
  full = jax.jit(functools.partial(lattice_lib._filter_at, lattice.capacity, reverse=False))(lattice, values)
  np.testing.assert_allclose(apply_filter(lattice, values), full, rtol=1e-6, atol=1e-6)


def test_segments_of_one_lattice_filter_as_if_each_were_alone():
  # Two point sets over the same region of feature space: with a segment word they share no lattice point.
  rng = np.random.default_rng(3)
  parts = [rng.random((n, 5)).astype(np.float32) * 4 for n in (300, 200)]
  values = [rng.random((len(p), 3)).astype(np.float32) for p in parts]
  segment = jnp.asarray(np.repeat([0, 1], [len(p) for p in parts]).astype(np.int32))
  features = jnp.asarray(np.concatenate(parts))
  joint = jax.jit(lambda f, s: lattice_lib.lattice_at(lattice_lib.lattice_points(f, s), 6 * len(f)))(features, segment)
  filtered = np.asarray(apply_filter(joint, jnp.asarray(np.concatenate(values))))
  alone = [np.asarray(apply_filter(build(jnp.asarray(p)), jnp.asarray(v))) for p, v in zip(parts, values)]
  np.testing.assert_allclose(filtered, np.concatenate(alone), rtol=1e-6, atol=1e-6)
  separate = sum(int(build(jnp.asarray(p)).num_points) for p in parts)
  assert int(joint.num_points) == separate


def _grid_and_hashed(features, segment, num_segments, capacity):
  """The Gaussian lattice of features [N, 2] built on a grid and hashed (segments as lattice_points')."""
  on_grid = grid.grid_lattice(grid.grid_points(features, segment, num_segments), capacity)
  hashed = lattice_lib.lattice_at(lattice_lib.lattice_points(features, segment), 3 * features.shape[0])
  return on_grid, hashed


@pytest.mark.parametrize("sxy", [grid.MIN_SXY, 1.0, 3.0])
def test_grid_lattice_filters_exactly_as_the_hashed_one(sxy):
  # Three photo crops packed as segments, the last pixels invalid (they take the first pixel's features,
  # as crf_features gives them): the same sums in the same order, so bit-equal, forward and transposed.
  rng = np.random.default_rng(7)
  shapes = [(37, 50), (64, 23), (5, 81)]
  position = np.concatenate([inference.flat_positions(h * w, w) for h, w in shapes])
  segment = np.repeat(np.arange(3, dtype=np.int32), [h * w for h, w in shapes])
  position[-40:], segment[-40:] = position[0], 0
  features = jnp.asarray(position / np.float32(sxy))
  capacity = sum(grid.grid_capacity(h, w, sxy) for h, w in shapes)
  on_grid, hashed = jax.jit(_grid_and_hashed, static_argnums=(2, 3))(features, jnp.asarray(segment), 3, capacity)
  assert int(on_grid.num_points) <= capacity
  values = jnp.asarray(rng.random((len(position), 2)).astype(np.float32))
  np.testing.assert_array_equal(apply_filter(on_grid, values), apply_filter(hashed, values))
  transposed = jax.jit(lambda lattice, v: jax.vjp(lambda x: lattice_filter(lattice, x), v)[1](v)[0])
  np.testing.assert_array_equal(transposed(on_grid, values), transposed(hashed, values))


def test_grid_capacity_bounds_every_image_box():
  # 60 random sizes and scales, each image its own segment (one program). A simplex's vertices lie within 2
  # of its point in each key coordinate, so each box has at most 2 (H-1) / sxy + 5 rows and
  # (W-1) / sqrt(3) / sxy + 3 columns (grid_capacity's factors); some boxes use all but one of each.
  rng = np.random.default_rng(11)
  sizes = [tuple(int(s) for s in rng.integers(1, 120, 2)) for _ in range(60)]
  scales = rng.choice([grid.MIN_SXY, 1.0, 1.7, 3.0, 13.0, 80.0], len(sizes))
  features = np.concatenate([np.stack(np.mgrid[:h, :w][::-1], -1).reshape(-1, 2).astype(np.float32) / np.float32(sxy)
                             for (h, w), sxy in zip(sizes, scales)])
  segment = np.repeat(np.arange(len(sizes), dtype=np.int32), [h * w for h, w in sizes])
  boxes = jax.jit(grid.grid_points, static_argnums=2)(jnp.asarray(features), jnp.asarray(segment), len(sizes)).shape
  for (height, width), sxy, (rows, cols) in zip(sizes, scales, np.asarray(boxes)):
    assert 0 < rows <= 2 * (height - 1) / sxy + 5 and 0 < cols <= (width - 1) / np.sqrt(3) / sxy + 3
    assert rows * cols <= grid.grid_capacity(height, width, sxy), (height, width, sxy)


@pytest.mark.parametrize("num_entries, key_range", [(64, 6), (5000, 12), (5000, 1000)])
def test_hash_table_ids_follow_first_occurrence(num_entries, key_range):
  rng = np.random.default_rng(num_entries + key_range)
  keys = rng.integers(-key_range, key_range, (num_entries, 3)).astype(np.int32)
  table = jax.jit(hash_table.insert)(jnp.asarray(keys))
  _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
  # Dense ids in order of each key's first entry, as a sequential insert (pydensecrf's) gives.
  expected_id = np.argsort(np.argsort(first))[inverse.ravel()]
  np.testing.assert_array_equal(table.entry_id, expected_id)
  assert int(table.num_unique) == len(first)
  np.testing.assert_array_equal(np.asarray(table.first_entry)[:len(first)], np.sort(first))
  absent = keys + 10 * key_range
  queries = jnp.asarray(np.concatenate([keys, absent]))
  valid = jnp.ones(2 * num_entries, bool).at[0].set(False)
  found = np.asarray(hash_table.lookup(table, jnp.asarray(keys), queries, valid))
  np.testing.assert_array_equal(found[1:num_entries], expected_id[1:])
  assert found[0] == -1 and (found[num_entries:] == -1).all()


@pytest.mark.parametrize("length", [1, 31, 32, 33, 129, 4129, 100_003])
def test_running_count_and_first_flagged_are_cumsum_and_nonzero(length):
  rng = np.random.default_rng(length)
  flags = rng.random(length) < 0.3
  np.testing.assert_array_equal(jax.jit(hash_table.running_count)(jnp.asarray(flags)), np.cumsum(flags))
  flagged = np.flatnonzero(flags)
  for size in (1, max(1, len(flagged) // 2), len(flagged) + 7):
    expected = np.full(size, -5)
    expected[:min(size, len(flagged))] = flagged[:size]
    first = jax.jit(hash_table._first_flagged, static_argnums=(1, 2))(jnp.asarray(flags), size, -5)
    np.testing.assert_array_equal(first, expected)


def test_scaled_filter_is_the_filter_of_the_scaled_values():
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.random((4000, 3)) * 6, jnp.float32)
  values = jnp.asarray(rng.random((4000, 5)), jnp.float32)
  scale = jnp.asarray(rng.random((4000, 1)) + 0.5, jnp.float32)
  lattice = build(features)
  composed = lambda values, scale: lattice_filter(lattice, scale * values)
  scaled = lambda values, scale: lattice_lib.scaled_filter(lattice, values, scale)
  np.testing.assert_array_equal(jax.jit(scaled)(values, scale), jax.jit(composed)(values, scale))
  cotangent = jnp.asarray(rng.standard_normal((4000, 5)), jnp.float32)
  expected = jax.vjp(composed, values, scale)[1](cotangent)
  for got, want in zip(jax.vjp(scaled, values, scale)[1](cotangent), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, scale, pad, num_labels, params_name", [
    ("chelsea", 0.5, (0, 37), 2, "voc"),
    ("chelsea", 0.5, (21, 5), 2, "default"),
    ("coffee", 0.25, (64, 64), 5, "voc"),
])
def test_padded_image_matches_pydensecrf_on_the_valid_region(name, scale, pad, num_labels, params_name):
  # Padding (noise colours, strong unaries) is marked invalid: on the valid region the marginals are
  # those of the unpadded image, as pydensecrf computes them at the original size.
  image = photo(name, scale)
  height, width = image.shape[:2]
  unary = make_unary((height, width), num_labels, "noisy", seed=2)
  rng = np.random.default_rng(3)
  padded_image = rng.integers(0, 256, (height + pad[0], width + pad[1], 3), dtype=np.uint8)
  padded_unary = (rng.random(padded_image.shape[:2] + (num_labels,)) * 20).astype(np.float32)
  padded_image[:height, :width], padded_unary[:height, :width] = image, unary
  valid = np.zeros(padded_image.shape[:2], bool)
  valid[:height, :width] = True
  crf = jax.jit(functools.partial(dense_crf, iterations=10, **PARAMS[params_name]))
  q = np.asarray(crf(padded_image, padded_unary, valid=valid))[:height, :width]
  q_ref = reference_crf(image, unary, **PARAMS[params_name])
  assert np.isfinite(q).all()
  assert np.mean(q.argmax(-1) == q_ref.argmax(-1)) >= 0.995
  assert np.abs(q - q_ref).mean() <= 1e-4, np.abs(q - q_ref).mean()


def test_valid_must_be_a_bool_map_of_the_image():
  image, unary = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.float32)
  with pytest.raises(ValueError, match=r"valid must be \[H, W\]"):
    dense_crf(image, unary, valid=np.ones((4, 3), bool))
  with pytest.raises(ValueError, match="valid must be"):
    dense_crf(image, unary, valid=np.ones((4, 4), np.float32))


def test_prebuilt_gaussian_lattice_serves_every_image_of_its_size():
  # One gaussian_lattice for a padded size (7 invalid rows below) serves two photographs of that size.
  height, width, params = 120, 160, VOC
  valid = np.zeros((height + 7, width), bool)
  valid[:height] = True
  gaussian = jax.jit(inference.gaussian_lattice, static_argnums=(0, 1, 2))(
      height + 7, width, params["gaussian_sxy"], valid)
  crf = jax.jit(functools.partial(dense_crf, iterations=10, **params))
  for seed, name in enumerate(("chelsea", "coffee")):
    image = np.ascontiguousarray(photo(name, 0.5)[:height, :width])
    unary = make_unary((height, width), 2, "noisy", seed=seed)
    padded_image = np.zeros((height + 7, width, 3), np.uint8)
    padded_unary = np.ones((height + 7, width, 2), np.float32)
    padded_image[:height], padded_unary[:height] = image, unary
    q = np.asarray(crf(padded_image, padded_unary, valid=valid, gaussian=gaussian))[:height]
    q_ref = reference_crf(image, unary, **params)
    assert np.mean(q.argmax(-1) == q_ref.argmax(-1)) >= 0.995
    assert np.abs(q - q_ref).mean() <= 1e-4, np.abs(q - q_ref).mean()


def test_prebuilt_gaussian_lattice_of_another_size_raises():
  image, unary = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 2), np.float32)
  with pytest.raises(ValueError, match=r"gaussian must be gaussian_lattice\(4, 4"):
    dense_crf(image, unary, gaussian=inference.gaussian_lattice(4, 5, 1.0))

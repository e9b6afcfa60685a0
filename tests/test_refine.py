"""framework.refine_batch / Refiner (images packed into canvases, batched) against jax.image.resize, pydensecrf
and numpy counts."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import skimage.data
import skimage.transform

from jaxseg import framework
from jaxseg.crf import dense_crf
from jaxseg.crf import inference
from jaxseg.crf import lattice
from jaxseg.framework import refine_pack
from jaxseg.framework import refine_programs
from jaxseg.framework import refine_resize

refine_lib = sys.modules["jaxseg.framework.refine"]  # framework.refine is the function
pytest.importorskip("pydensecrf.densecrf")
from experiments.benchmarks.crf import reference_crf  # noqa: E402

PARAMS = framework.CRFParams()
GRID = (8, 10)


def make_image(size, photo="chelsea"):
  image = skimage.transform.resize(getattr(skimage.data, photo)(), size, anti_aliasing=True)
  return (image * 255).round().astype(np.uint8)


def make_prob(seed, grid=GRID):
  rng = np.random.default_rng(seed)
  return skimage.transform.resize(rng.random((3, 4)), grid, order=1).astype(np.float32)


def make_items(sizes, seed=0, photo="chelsea"):
  return [framework.RefineItem(i, make_image(size, photo), make_prob(seed + i)) for i, size in enumerate(sizes)]


def expected(image, fg_prob, params=PARAMS, max_side=0):
  """Independent computation: jax.image.resize (image antialiased, probability linear), pydensecrf argmax,
  the mask scaled back by nearest (numpy index arithmetic)."""
  size = image.shape[:2]
  work = size
  if max_side and max(size) > max_side:
    scale = max_side / max(size)
    work = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
  work_image = np.asarray(jax.image.resize(image.astype(np.float32), work + (3,), "linear", antialias=True))
  work_image = np.clip(np.round(work_image), 0, 255).astype(np.uint8)
  p = np.asarray(jax.image.resize(fg_prob, work, method="linear"))
  if not params.iterations:
    mask = p > 0.5
  else:
    p = np.clip(p, 1e-5, 1 - 1e-5)
    unary = -np.log(np.stack([1 - p, p], axis=-1)).astype(np.float32)
    mask = reference_crf(work_image, unary, params.iterations, gaussian_sxy=params.gaussian_sxy,
                         gaussian_weight=params.gaussian_weight, bilateral_sxy=params.bilateral_sxy,
                         bilateral_srgb=params.bilateral_srgb, bilateral_weight=params.bilateral_weight
                         ).argmax(-1) == 1
  rows = ((np.arange(size[0]) + 0.5) * work[0] / size[0]).astype(int)
  cols = ((np.arange(size[1]) + 0.5) * work[1] / size[1]).astype(int)
  return mask[rows[:, None], cols[None, :]]


def packing_spy(monkeypatch):
  """Records, for every batch a Refiner runs, the keys of the images in each canvas."""
  batches = []
  run = refine_lib.Refiner._refine

  def spy(self, canvases, rows):
    batches.append([[work.key for work in canvas.works] for canvas in canvases])
    return run(self, canvases, rows)

  monkeypatch.setattr(refine_lib.Refiner, "_refine", spy)
  return batches


def test_refine_batch_of_mixed_sizes_matches_pydensecrf_image_by_image_in_order(monkeypatch):
  # 130 x 90 is above max_side (refined at 100 x 69); 6 x 7 is smaller than the patch grid (resized down).
  params, options = framework.CRFParams(iterations=5), framework.RefineOptions(max_side=100)
  sizes = [(40, 50), (130, 90), (61, 83), (6, 7), (30, 20)]
  images = [make_image(size, photo) for size, photo in zip(sizes, ["chelsea", "coffee"] * 3)]
  probs = [make_prob(i) for i in range(len(sizes))]
  batches = packing_spy(monkeypatch)
  masks = framework.refine_batch(images, np.stack(probs), params, options)
  assert batches == [[[0, 1, 2, 3, 4]]]  # one canvas, one program pair, in order of arrival
  assert [m.shape for m in masks] == sizes and all(m.dtype == bool for m in masks)
  for image, prob, mask in zip(images, probs, masks):
    np.testing.assert_array_equal(mask, expected(image, prob, params, max_side=100))


@pytest.mark.parametrize("bad", [np.float32, np.uint16, "gray", "rgba"])
def test_images_that_are_not_uint8_rgb_are_refused_naming_dtype_and_shape(bad):
  image = make_image((20, 30))
  if bad == "gray":
    image = image[..., 0]
  elif bad == "rgba":
    image = np.concatenate([image, image[..., :1]], axis=-1)
  else:
    image = image.astype(bad) / (255 if bad == np.float32 else 1)  # [0, 1] floats; uint16 as 8-bit values
    image = image.astype(bad)
  message = f"image 0 must be uint8 RGB [H, W, 3], got {image.dtype} {image.shape}"
  with pytest.raises(ValueError, match=re.escape(message)):
    framework.refine_batch([image], [make_prob(0)], PARAMS)
  with pytest.raises(ValueError, match="image 'a' must be uint8"):
    list(framework.refine_stream([("a", image, make_prob(0))], PARAMS))
  with pytest.raises(ValueError, match="image must be (uint8|\\[H, W, 3\\])"):  # as dense_crf refuses them
    dense_crf(image, np.zeros(image.shape[:2] + (2,), np.float32))


def test_bad_probabilities_and_counts_are_refused_naming_the_image():
  image, prob = make_image((20, 30)), make_prob(0)
  with pytest.raises(ValueError, match="fg_prob of image 0 has 1 non-finite"):
    framework.refine_batch([image], [np.where(np.arange(prob.size).reshape(prob.shape) == 3, np.nan, prob)])
  with pytest.raises(ValueError, match="fg_prob of image 0 must be float \\[h, w\\]"):
    framework.refine_batch([image], [prob[None]])
  with pytest.raises(ValueError, match="2 images but 1 fg_prob"):
    framework.refine_batch([image, image], [prob])


def test_overflow_forced_through_tiny_capacities_gives_the_ample_masks():
  params, options = framework.CRFParams(iterations=3), framework.RefineOptions(canvas_pixels=4096)
  items = make_items([(40, 50), (44, 52)], seed=40)
  ample = framework.Refiner(params, options)
  want = dict(ample.stream(items))
  (canvas, (gaussian, bilateral)), = ample.capacities.items()
  # Rungs of the one ladder, which dense_crf's switched capacities are also drawn from.
  assert gaussian in lattice.capacity_ladder(canvas, 2) and bilateral in lattice.capacity_ladder(canvas, 5)
  assert set(inference.bilateral_capacities(canvas)) <= set(lattice.capacity_ladder(canvas, 5))
  # Seeded too small: the counted points move the canvas's capacities up before the CRF runs.
  seeded = framework.Refiner(params, options)
  seeded.capacities[canvas] = (16, 16)
  got = dict(seeded.stream(items))
  assert seeded.capacities[canvas] == (gaussian, bilateral)
  # Forced to run too small: the marginals come out non-finite, and the batch runs again at rungs that hold it.
  forced = framework.Refiner(params, options)
  forced.choose_capacities = lambda pixels, num_points: (gaussian // 2, bilateral // 2)
  got_forced = dict(forced.stream(items))
  for key in want:
    assert want[key].any() and not want[key].all()
    np.testing.assert_array_equal(got[key], want[key])
    np.testing.assert_array_equal(got_forced[key], want[key])
  assert ("crf", canvas, (gaussian // 2, bilateral // 2)) in forced.programs
  assert forced.capacities[canvas][0] >= gaussian and forced.capacities[canvas][1] >= bilateral


def test_two_refiners_share_no_state():
  items = make_items([(40, 50)], seed=50)
  first = framework.Refiner(framework.CRFParams(iterations=3), framework.RefineOptions(canvas_pixels=4096))
  second = framework.Refiner(framework.CRFParams(iterations=0), framework.RefineOptions(canvas_pixels=4096))
  dict(first.stream(items))
  assert first.num_programs == 2 and first.capacities
  assert second.num_programs == 0 and not second.capacities
  mask, = dict(second.stream(items)).values()
  np.testing.assert_array_equal(mask, expected(items[0].image, items[0].fg_prob, second.params))
  assert second.num_programs == 0 and not second.capacities  # no CRF: no program
  # No module-level mutable state in the refinement modules.
  for module in (refine_lib, refine_pack, refine_programs, refine_resize):
    mutable = [name for name, value in vars(module).items()
               if isinstance(value, (dict, list, set)) and not name.startswith("__")]
    assert not mutable, (module.__name__, mutable)


def test_program_bound_over_a_split_of_many_sizes_read_from_the_refiner(monkeypatch):
  compiles = []

  def listen(event, seconds, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(listen)
  sizes = [(30 + 3 * i, 60 - 2 * i) for i in range(14)]
  params, options = framework.CRFParams(iterations=2), framework.RefineOptions(canvas_pixels=8192)
  refiner = framework.Refiner(params, options)
  batches = packing_spy(monkeypatch)
  try:
    masks = dict(refiner.stream(make_items(sizes, seed=60)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert sorted(masks) == list(range(len(sizes))) and len(batches) > 1
  # One prepare program per canvas size and one CRF program per capacity pair it ran at: far fewer than sizes.
  assert refiner.num_programs <= 3 < len(sizes), refiner.programs
  assert {key[1] for key in refiner.programs} == {8192}
  assert len(compiles) <= refiner.num_programs  # nothing else compiled per size (some may come from jax's cache)


def test_no_crf_thresholds_the_resized_probability():
  items = make_items([(40, 50), (7, 5)], seed=70)
  masks = framework.refine_batch([i.image for i in items], [i.fg_prob for i in items], framework.CRFParams(iterations=0))
  for item, mask in zip(items, masks):
    np.testing.assert_array_equal(mask, expected(item.image, item.fg_prob, framework.CRFParams(iterations=0)))


def test_canvases_fill_first_fit_and_flush_the_fullest(monkeypatch):
  # 150,000 and 180,000 pixels: one big per canvas of 262,144 (no two fit); 60 x 50 ones fill the gaps.
  options = framework.RefineOptions(canvas_pixels=1 << 18)
  big = [(f"big{i}", make_image((360 if i == 1 else 300, 500)), make_prob(i)) for i in range(5)]
  small = [(f"small{i}", make_image((60, 50)), make_prob(i)) for i in range(3)]
  batches = packing_spy(monkeypatch)
  results = dict(framework.refine_stream(big[:4] + small + big[4:], framework.CRFParams(iterations=0), options))
  # 4 canvases open (batch rows + 3); the smalls go into the first with room, big0's (159,000 pixels then);
  # big4 finds no room and flushes the fullest canvas, big1's; the rest go at the end, fullest first.
  assert batches == [[["big1"]], [["big0", "small0", "small1", "small2"]], [["big2"]], [["big3"]], [["big4"]]], batches
  assert sorted(results) == sorted(key for key, _, _ in big + small)


def test_a_canvas_takes_images_while_their_lattices_fit_and_a_thin_strip_gets_a_larger_canvas(monkeypatch):
  # 1 x 128 strips at sxy 0.8 need up to 474 Gaussian cells each (3.7 per pixel): 25 fill the 3 x 4,096 of a
  # 4,096-pixel canvas, though 32 would fit its pixels and slots. Each still refines as it does alone.
  params, options = framework.CRFParams(iterations=2, gaussian_sxy=0.8), framework.RefineOptions(canvas_pixels=4096)
  rng = np.random.default_rng(5)
  photo = skimage.data.chelsea()
  items = [(i, np.ascontiguousarray(photo[8 * i:8 * i + 1, :128]), rng.random((1, 2)).astype(np.float32))
           for i in range(30)]
  batches = packing_spy(monkeypatch)
  packed = dict(framework.refine_stream(items, params, options))
  assert [len(canvas) for batch in batches for canvas in batch] == [25, 5]
  for key, image, prob in items[:1] + items[-1:]:
    np.testing.assert_array_equal(packed[key], expected(image, prob, params))
  # A 1 x 4,096 strip needs up to 14,788 cells, more than a 4,096-pixel canvas holds: it gets 8,192 pixels.
  assert refine_pack.canvas_size(1, 128, 4096, 0.8) == 4096 and refine_pack.canvas_size(1, 4096, 4096, 0.8) == 8192


def test_level_stats_against_jax_image_resize_and_numpy_counts():
  rng = np.random.default_rng(8)
  scores, prob = rng.random((3, 8, 10)).astype(np.float32), make_prob(80)
  refined = rng.random((37, 53)) > 0.5
  truth = (rng.random((37, 53)) > 0.5).astype(np.uint8) * 7
  truth[:3] = 255
  masks = [np.asarray(jax.image.resize(g, (37, 53), method="linear")) > 0.5 for g in [*scores, prob]] + [refined]
  counted, gt = truth != 255, (truth != 255) & (truth != 0)
  fg_pixels, counts = framework.level_stats(scores, prob, refined, truth)
  np.testing.assert_array_equal(fg_pixels, [m.sum() for m in masks])
  np.testing.assert_array_equal(counts, [[np.sum(m & gt), np.sum((m | gt) & counted)] for m in masks])
  _, no_truth = framework.level_stats(scores, prob, refined, None)
  np.testing.assert_array_equal(no_truth, np.zeros((5, 2)))
  with pytest.raises(ValueError, match="truth must be \\[H, W\\] = \\(37, 53\\)"):
    framework.level_stats(scores, prob, refined, truth[:5])


@pytest.mark.parametrize("src, dst", [((8, 10), (37, 53)), ((32, 32), (20, 9)), ((50, 40, 3), (17, 33, 3))])
def test_resize_linear_is_jax_image_resize(src, dst):
  array = np.random.default_rng(9).random(src).astype(np.float32)
  np.testing.assert_allclose(refine_resize.resize_linear(array, dst[:2]),
                             jax.image.resize(array, dst, method="linear"), atol=2e-6)


_RSS_CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    from tests.test_refine import make_items
    from jaxseg import framework
    items = make_items({sizes!r})
    options = framework.RefineOptions(batch_size=2)
    for _ in framework.refine_stream(items, framework.CRFParams(iterations=3), options):
      pass
    print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_rss_kb(sizes) -> int:
  root = str(pathlib.Path(__file__).resolve().parents[1])
  code = _RSS_CHILD.format(root=root, sizes=sizes)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200, cwd=root,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  return int(next(l for l in done.stdout.splitlines() if l.startswith("RSS")).split()[1])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_sizes():
  # 16 images in 16 sizes vs in 3 sizes, sides 129-180: the same canvas size for both.
  rng = np.random.default_rng(0)
  many = [(int(h), int(w)) for h, w in zip(rng.permutation(np.arange(130, 180, 3))[:16], rng.integers(129, 180, 16))]
  few = [((130, 130), (150, 170), (179, 179))[i % 3] for i in range(16)]
  assert len(set(many)) == 16
  canvas = lambda sizes: {refine_pack.canvas_size(h, w, 3 << 17, PARAMS.gaussian_sxy) for h, w in sizes}
  assert canvas(many) == canvas(few)
  rss_many, rss_few = _peak_rss_kb(many), _peak_rss_kb(few)
  assert rss_many <= 1.15 * rss_few, (rss_many, rss_few)

"""framework.refine_stream (images packed into canvases, batched) against jax.image.resize, pydensecrf and numpy counts."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import skimage.data
import skimage.transform

from jaxseg import framework

refine_lib = sys.modules["jaxseg.framework.refine"]
pytest.importorskip("pydensecrf.densecrf")
from experiments.benchmarks.crf import reference_crf  # noqa: E402

CRF = framework.CRFConfig()
GRID = (8, 10)


def crf_params(crf):
  return dict(gaussian_sxy=crf.gaussian_sxy, gaussian_weight=crf.gaussian_weight, bilateral_sxy=crf.bilateral_sxy,
              bilateral_srgb=crf.bilateral_srgb, bilateral_weight=crf.bilateral_weight)


def make_item(key, size, seed, with_truth=True, photo="chelsea"):
  rng = np.random.default_rng(seed)
  image = skimage.transform.resize(getattr(skimage.data, photo)(), size, anti_aliasing=True)
  image = (image * 255).round().astype(np.uint8)
  field = lambda: skimage.transform.resize(rng.random((3, 4)), GRID, order=1).astype(np.float32)
  truth = None
  if with_truth:
    truth = (skimage.transform.resize(rng.random((4, 4)), size, order=1) > 0.5).astype(np.uint8) * 7
    truth[:2] = 255
  return framework.RefineItem(key=key, image=image, fg_prob=field(), level_scores=np.stack([field() for _ in range(3)]),
                              truth=truth)


def expected(item, crf=CRF):
  """Independent computation: jax.image.resize upsampling, pydensecrf argmax, numpy counts."""
  size = item.image.shape[:2]
  resize = lambda grid: np.asarray(jax.image.resize(grid, size, method="linear"))
  probs = [resize(s) for s in item.level_scores] + [resize(item.fg_prob)]
  p = np.clip(probs[3], 1e-5, 1 - 1e-5)
  unary = -np.log(np.stack([1 - p, p], axis=-1)).astype(np.float32)
  refined = reference_crf(item.image, unary, crf.iterations, **crf_params(crf)).argmax(-1) == 1
  return [prob > 0.5 for prob in probs] + [refined]


def numpy_counts(masks, truth):
  if truth is None:
    return np.zeros((len(masks), 2), np.int64)
  counted, gt = truth != 255, (truth != 255) & (truth != 0)
  return np.array([[np.sum(m & gt & counted), np.sum((m | gt) & counted)] for m in masks], np.int64)


def test_upsample_flat_equals_jax_image_resize():
  rng = np.random.default_rng(0)
  grids = rng.random((2, 7, 9)).astype(np.float32)
  upsample = jax.jit(refine_lib.upsample_flat, static_argnums=2)
  for height, width in [(7, 9), (8, 31), (50, 9), (123, 77)]:
    flat = np.asarray(upsample(grids, np.array([height, width], np.int32), 128 * 128))
    for k in range(2):
      want = np.asarray(jax.image.resize(grids[k], (height, width), method="linear"))
      np.testing.assert_allclose(flat[k, :height * width].reshape(height, width), want, atol=1e-6)


def packing_spy(monkeypatch):
  """Records, for every batch refine_stream runs, the keys of the images in each canvas."""
  batches = []
  run = refine_lib._run_canvases

  def spy(canvases, *args):
    batches.append([[item.key for item in canvas.items] for canvas in canvases])
    return run(canvases, *args)

  monkeypatch.setattr(refine_lib, "_run_canvases", spy)
  return batches


@pytest.mark.slow
def test_stream_of_many_sizes_matches_independent_computation_in_few_programs(monkeypatch):
  # 18 sizes, all packed into canvases of crf.canvas_pixels; the last item has no truth.
  sizes = [(64 + 3 * i, 100 - 2 * i) for i in range(9)] + [(100 + 3 * i, 130 - 2 * i) for i in range(9)]
  items = [make_item(i, size, seed=i, with_truth=i != len(sizes) - 1) for i, size in enumerate(sizes)]
  canvases = {refine_lib.canvas_size(h * w, CRF.canvas_pixels) for h, w in sizes}
  assert canvases == {CRF.canvas_pixels}
  batches = packing_spy(monkeypatch)
  before = framework.refine_programs()
  results = dict(framework.refine_stream(items, CRF))
  compiled = framework.refine_programs() - before
  per_canvas = [len(canvas) for batch in batches for canvas in batch]
  assert sum(per_canvas) == len(sizes) and max(per_canvas) > 1  # images shared canvases
  assert sorted(results) == list(range(len(sizes)))
  for item in items:
    got, masks = results[item.key], expected(item)
    assert got.mask.shape == item.image.shape[:2] and got.mask.dtype == bool
    assert np.mean(got.mask == masks[4]) >= 0.995
    np.testing.assert_array_equal(got.fg_pixels, [int(m.sum()) for m in masks[:4]] + [int(got.mask.sum())])
    np.testing.assert_array_equal(got.counts, numpy_counts(masks[:4] + [got.mask], item.truth))
  # The static bound, canvas sizes x (1 + Gaussian rungs x bilateral rungs), and what a split of fewer than
  # a few canvases compiles: one prepare and one CRF program per canvas size, far fewer than sizes.
  bound = sum(1 + len(refine_lib.bilateral_rungs(c)) * len(refine_lib.gaussian_rungs(c, CRF.gaussian_sxy))
              for c in canvases)
  assert compiled <= min(bound, 2 * len(canvases)) < len(sizes), (compiled, bound)


@pytest.mark.slow
def test_batch_mixing_sizes_in_one_canvas_matches_pydensecrf_image_by_image(monkeypatch):
  sizes = [(150, 210), (140, 200), (128, 250)]
  items = [make_item(i, size, seed=10 + i, photo="coffee") for i, size in enumerate(sizes)]
  batches = packing_spy(monkeypatch)
  prepared_before = refine_lib._prepare._cache_size()
  results = dict(framework.refine_stream(items, CRF, batch_size=3))
  assert batches == [[[0, 1, 2]]]  # one canvas holds all three
  assert refine_lib._prepare._cache_size() - prepared_before <= 1  # one batch, one program
  for item in items:
    assert np.mean(results[item.key].mask == expected(item)[4]) >= 0.995


@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_and_several_canvases_per_device_match_pydensecrf(monkeypatch, batch_size):
  # batch_size 1: one row per device, refined directly; 3: rows mapped one by one, the padding row skipped.
  crf = framework.CRFConfig(iterations=3, canvas_pixels=4096)
  items = [make_item(i, size, seed=30 + i) for i, size in enumerate([(40, 50), (41, 48), (38, 52)])]
  batches = packing_spy(monkeypatch)
  results = dict(framework.refine_stream(items, crf, batch_size=batch_size))
  assert sorted(map(sorted, sum(batches, []))) == [[0, 1], [2]]  # two canvases; with 3 rows, one padding row
  for item in items:
    masks = expected(item, crf)
    got = results[item.key]
    assert np.mean(got.mask == masks[4]) >= 0.995
    np.testing.assert_array_equal(got.fg_pixels, [int(m.sum()) for m in masks[:4]] + [int(got.mask.sum())])
    np.testing.assert_array_equal(got.counts, numpy_counts(masks[:4] + [got.mask], item.truth))


def test_packed_images_refine_exactly_as_each_alone(monkeypatch):
  # Overlapping positions and colours (crops of one photo): only the lattices' image word keeps them apart.
  crf = framework.CRFConfig(iterations=3)
  items = [make_item(i, size, seed=20 + i) for i, size in enumerate([(40, 50), (44, 52), (40, 50), (37, 61)])]
  batches = packing_spy(monkeypatch)
  packed = dict(framework.refine_stream(items, crf))
  assert batches == [[[0, 1, 2, 3]]]
  for item in items:
    (_, alone), = framework.refine_stream([item], crf)
    np.testing.assert_array_equal(packed[item.key].mask, alone.mask)
    np.testing.assert_array_equal(packed[item.key].fg_pixels, alone.fg_pixels)
    np.testing.assert_array_equal(packed[item.key].counts, alone.counts)


def test_canvases_fill_first_fit_and_flush_the_fullest(monkeypatch):
  # 150,000 and 180,000 pixels: one big per canvas of 262,144 (no two fit); 60 x 50 ones fill the gaps.
  crf = framework.CRFConfig(iterations=0, canvas_pixels=1 << 18)
  big = [make_item(f"big{i}", (360 if i == 1 else 300, 500), seed=i) for i in range(5)]
  small = [make_item(f"small{i}", (60, 50), seed=i) for i in range(3)]
  batches = packing_spy(monkeypatch)
  results = dict(framework.refine_stream(big[:4] + small + big[4:], crf))
  # 4 canvases open (batch rows + 3); the smalls go into the first with room, big0's (159,000 pixels then);
  # big4 finds no room and flushes the fullest canvas, big1's; the rest go at the end, fullest first.
  assert batches == [[["big1"]], [["big0", "small0", "small1", "small2"]], [["big2"]], [["big3"]], [["big4"]]], batches
  assert sorted(results) == sorted(item.key for item in big + small)


def test_a_canvas_takes_images_while_their_lattices_fit_its_largest_rung(monkeypatch):
  # 1 x 128 strips at sxy 0.8 need up to 474 Gaussian cells each (3.7 per pixel): 25 fill the 3 x 4,096 of a
  # 4,096-pixel canvas, though 32 would fit its pixels and slots. Each still refines as it does alone.
  crf = framework.CRFConfig(iterations=2, canvas_pixels=4096, gaussian_sxy=0.8)
  rng = np.random.default_rng(5)
  photo = skimage.data.chelsea()
  items = [framework.RefineItem(key=i, image=np.ascontiguousarray(photo[8 * i:8 * i + 1, :128]),
                                fg_prob=rng.random((1, 2)).astype(np.float32),
                                level_scores=rng.random((3, 1, 2)).astype(np.float32), truth=None) for i in range(30)]
  batches = packing_spy(monkeypatch)
  packed = dict(framework.refine_stream(items, crf))
  assert [len(canvas) for batch in batches for canvas in batch] == [25, 5]
  for item in items[:2] + items[-2:]:
    (_, alone), = framework.refine_stream([item], crf)
    np.testing.assert_array_equal(packed[item.key].mask, alone.mask)
  # A 1 x 4,096 strip needs up to 14,788 cells, more than any 4,096-pixel canvas holds: it runs at its own size.
  long_strip = items[0]._replace(image=np.tile(items[0].image, (1, 32, 1)))
  assert refine_lib._canvas_of(items[0], crf) == 4096 and refine_lib._canvas_of(long_strip, crf) is None


def test_single_image_refine_and_no_crf(monkeypatch):
  item = make_item(0, (40, 50), seed=3, with_truth=False)
  canvases = []
  run = refine_lib._run_canvases
  monkeypatch.setattr(refine_lib, "_run_canvases", lambda c, *a: canvases.append(c[0].pixels) or run(c, *a))
  mask = framework.refine(item.image, item.fg_prob, CRF)
  assert mask.shape == (40, 50) and np.mean(mask == expected(item)[4]) >= 0.995
  assert canvases == [4096]  # 2,000 pixels: its own small canvas, not one of crf.canvas_pixels
  no_crf = framework.CRFConfig(iterations=0)
  (_, got), = framework.refine_stream([item], no_crf)
  fused = expected(item, framework.CRFConfig(iterations=1))[3]
  np.testing.assert_array_equal(got.mask, fused)
  np.testing.assert_array_equal(got.counts, np.zeros((5, 2)))


def test_bad_items_raise_naming_the_key():
  item = make_item("img7", (20, 30), seed=0)
  with pytest.raises(ValueError, match="img7.*level_scores"):
    list(framework.refine_stream([item._replace(level_scores=item.level_scores[:2])], CRF))
  with pytest.raises(ValueError, match="img7.*truth"):
    list(framework.refine_stream([item._replace(truth=item.truth[:5])], CRF))


_RSS_CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    from tests.test_refine import make_item
    from jaxseg import framework
    sizes = {sizes!r}
    items = [make_item(i, size, seed=i) for i, size in enumerate(sizes)]
    for _ in framework.refine_stream(items, framework.CRFConfig(iterations=3), batch_size=2):
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
  canvas = lambda sizes: {refine_lib.canvas_size(h * w, CRF.canvas_pixels) for h, w in sizes}
  assert canvas(many) == canvas(few)
  rss_many, rss_few = _peak_rss_kb(many), _peak_rss_kb(few)
  assert rss_many <= 1.15 * rss_few, (rss_many, rss_few)


def test_a_dense_first_canvas_gets_a_bilateral_rung_near_its_headroom():
  canvas = CRF.canvas_pixels
  rungs = refine_lib.bilateral_rungs(canvas)
  assert rungs[0] == 6 * canvas and all(a <= 1.5 * b + 1 for a, b in zip(rungs, rungs[1:])), rungs
  program = ("test_dense_first_canvas", object())  # a key no stream uses
  for per_pixel in (0.4, 0.8, 1.4):
    gaussian, bilateral = refine_lib._capacities(
        program, (refine_lib.gaussian_rungs(canvas, CRF.gaussian_sxy), rungs), (canvas, int(per_pixel * canvas)))
    refine_lib._COMPILED.pop(program)
    # x1.4 headroom, then the next rung at most 1.5x above: never a blur of 3x the points or more.
    assert 1.4 * per_pixel * canvas <= bilateral <= 2.1 * per_pixel * canvas, (per_pixel, bilateral / canvas)


def test_capacities_reuse_compiled_pairs_until_a_tight_one_pays(monkeypatch):
  monkeypatch.setattr(refine_lib, "_RECOMPILE_EXCESS", 3.0)
  rungs, program = ((400, 200, 100), (800, 400, 200, 100)), ("test_capacities", object())  # a key no stream uses
  picks = [refine_lib._capacities(program, rungs, n) for n in
           [(90, 90), (90, 90), (150, 250), (90, 90), (90, 90), (300, 300), (90, 90)]]
  assert picks == [
      (200, 200),  # nothing compiled: headroom (x1.15, x1.4) over the tight (100, 100)
      (200, 200),  # reused; (100, 100) wanted, 1 in excess (400 rows for 200)
      (200, 400),  # (200, 200) does not hold 250 bilateral points: compiled with headroom (173, 350)
      (200, 200),  # the smaller of the two that hold it; (100, 100) wanted, 2 in excess
      (100, 100),  # 3 in excess: compiled
      (400, 800),  # nothing holds it: headroom (345, 420)
      (100, 100),
  ], picks
  # A canvas past every rung gets the largest (it never overflows: the largest rungs are N (d+1)).
  assert refine_lib._capacities(program, rungs, (10 ** 6, 10 ** 6)) == (400, 800)
  # A want weighs its excess rows: (100, 100) run at (200, 400) is 2 in excess, (200, 100) 1.
  program = ("test_capacities_excess", object())
  assert refine_lib._capacities(program, rungs, (90, 150)) == (200, 400)  # headroom (104, 210)
  picks = [refine_lib._capacities(program, rungs, n) for n in [(90, 90), (150, 90), (90, 90), (150, 90), (150, 90)]]
  assert picks == [(200, 400), (200, 400), (100, 100), (200, 400), (200, 100)], picks

"""The method's stages on planted features: known foreground, background and categories plus noise.

Every image has one rectangular object (away from the border) of one of
NUM_CATEGORIES categories on one of two background scenes. Features are unit
vectors around fg/bg means that share a common "object" / "scene" direction,
as ViT features do; CLS tokens sit near their category's mean; CLS attention is
higher on the object. Scores are checked with jaxseg.metrics against the
planted truth.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jaxseg import framework
from jaxseg import metrics
from jaxseg.framework import labeling

GRID = 10
DIM = 32
NUM_IMAGES = 18
NUM_CATEGORIES = 3
CFG = framework.MethodConfig(num_categories=NUM_CATEGORIES, num_classes=NUM_CATEGORIES, sample_budget=600,
                             kmeans_n_init=3, crf=framework.CRFConfig(iterations=5))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(seed=0, noise=0.4):
  """Returns (PatchFeatures, fg [N, h, w] bool, category [N] int)."""
  rng = np.random.default_rng(seed)
  common_fg, common_bg = rng.normal(size=(2, DIM))
  fg_means = _unit(common_fg + 0.6 * rng.normal(size=(NUM_CATEGORIES, DIM)))
  bg_means = _unit(common_bg + 0.6 * rng.normal(size=(2, DIM)))
  cls_means = _unit(rng.normal(size=(NUM_CATEGORIES, DIM)))
  category = np.arange(NUM_IMAGES) % NUM_CATEGORIES
  fg = np.zeros((NUM_IMAGES, GRID, GRID), bool)
  for i in range(NUM_IMAGES):
    top, left = rng.integers(1, 4, 2)
    height, width = rng.integers(4, GRID - 4, 2)
    fg[i, top:top + height, left:left + width] = True
  means = np.where(fg[..., None], fg_means[category][:, None, None], bg_means[np.arange(NUM_IMAGES) % 2][:, None, None])
  patches = _unit(means + noise * rng.normal(size=means.shape) / np.sqrt(DIM) * 4)
  cls = _unit(cls_means[category] + 0.2 * rng.normal(size=(NUM_IMAGES, DIM)))
  attention = np.where(fg, 0.02, 0.005) + 0.003 * rng.random(fg.shape)
  features = framework.PatchFeatures(patches.astype(np.float32), cls.astype(np.float32),
                                     attention.astype(np.float32), np.ones(fg.shape, bool))
  return features, fg, category


def iou(pred, truth):
  return metrics.foreground_iou(metrics.foreground_counts(np.asarray(pred), np.asarray(truth, np.int32)))


@pytest.fixture(scope="module")
def data():
  return planted()


@pytest.fixture(scope="module")
def result(data):
  features, _, _ = data
  return framework.segment_features(features, CFG, key=jax.random.key(0), batch_size=4)


def test_every_level_recovers_the_planted_foreground(data, result):
  _, fg, _ = data
  for level in range(3):
    assert iou(result.level_masks[level], fg) >= 0.9, level
  assert iou(result.fg_mask, fg) >= 0.9
  np.testing.assert_array_equal(result.fg_mask, np.asarray(result.fg_prob) > 0.5)


def test_category_level_recovers_the_planted_categories(data, result):
  _, _, category = data
  cm = metrics.confusion_matrix(np.asarray(result.categories), category, NUM_CATEGORIES, NUM_CATEGORIES)
  assert metrics.hungarian_scores(cm)["miou"] >= 0.9


@pytest.mark.parametrize("changes", [dict(fg_prior="attention"), dict(dataset_k=3), dict(fusion="mean")],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_variants_recover_the_planted_foreground(data, changes):
  features, fg, _ = data
  cfg = dataclasses.replace(CFG, **changes)
  result = framework.segment_features(features, cfg, key=jax.random.key(1))
  assert iou(result.level_masks[0], fg) >= 0.9
  assert iou(result.fg_mask, fg) >= 0.9


@pytest.mark.parametrize("batch_size", [NUM_IMAGES, 5])
def test_any_batch_size_gives_the_same_levels_and_masks(data, result, batch_size):
  """Sampling is keyed per image, so with sample_budget (600) below the split's 1800 patches the reservoirs,
  hence the levels, do not depend on the batching (batches of 4 padded by 2, one of 18, 5s padded by 2)."""
  features, _, _ = data
  other = framework.segment_features(features, CFG, key=jax.random.key(0), batch_size=batch_size)
  np.testing.assert_array_equal(other.categories, result.categories)
  np.testing.assert_array_equal(other.dataset.foreground, result.dataset.foreground)
  for name in ("centroids", "prototypes"):
    np.testing.assert_allclose(getattr(other.dataset, name), getattr(result.dataset, name), atol=1e-6, err_msg=name)
  np.testing.assert_allclose(other.category_centroids, result.category_centroids, atol=1e-6)
  np.testing.assert_allclose(other.category_prototypes, result.category_prototypes, atol=1e-6)
  np.testing.assert_allclose(other.fg_prob, result.fg_prob, atol=1e-6)
  np.testing.assert_array_equal(other.fg_mask, result.fg_mask)


LEVEL_CATEGORIES = 4
LEVEL_CFG = dataclasses.replace(CFG, num_categories=LEVEL_CATEGORIES, num_classes=LEVEL_CATEGORIES,
                                sample_budget=4000)


def planted_wrong_parent(wrong_level, seed=0, noise=0.5):
  """A split on which one level is wrong on some images and the level below it must correct it.

  fg and bg means sit near two orthogonal directions F and B; each category's CLS tokens
  cluster apart, so the category level recovers the categories. Objects stay off the border.
    wrong_level="dataset": the last category's background lies 40 degrees from F, 50 from B:
      the dataset level calls it foreground, but inside that category it is the cluster
      farther from the dataset's fg prototype, so the category 2-means turns it back to bg.
    wrong_level="category": category 0's usual background lies along B + 2E (E orthogonal to
      F and B); two of its images have a background along 0.2F + 0.7B - 0.6E, on the fg side
      of that category's 2-means (so the category level is wrong there) but on the bg side of
      the dataset's (the dataset level is right); each of those images' own 2-means splits
      object from background.

  Returns:
    (PatchFeatures, fg [N, h, w] bool, affected [N] bool: the images where wrong_level is wrong).
  """
  rng = np.random.default_rng(seed)
  per_category = 6 if wrong_level == "dataset" else 8
  count = LEVEL_CATEGORIES * per_category
  f_dir, b_dir, e_dir, *others = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0].T
  jitter = lambda n: 0.25 * _unit(rng.normal(size=(n, DIM - 3)) @ np.asarray(others))
  fg_means = _unit(f_dir + 0.6 * jitter(LEVEL_CATEGORIES))
  bg_means = _unit(b_dir + jitter(LEVEL_CATEGORIES))
  category = np.arange(count) % LEVEL_CATEGORIES
  image_bg = bg_means[category]
  if wrong_level == "dataset":
    angle = np.deg2rad(40)
    image_bg[category == LEVEL_CATEGORIES - 1] = _unit(np.cos(angle) * f_dir + np.sin(angle) * b_dir)
    affected = category == LEVEL_CATEGORIES - 1
  else:
    image_bg[category == 0] = _unit(b_dir + 2 * e_dir)
    affected = np.zeros(count, bool)
    affected[np.flatnonzero(category == 0)[:2]] = True
    image_bg[affected] = _unit(0.2 * f_dir + 0.7 * b_dir - 0.6 * e_dir)
  fg = np.zeros((count, GRID, GRID), bool)
  for i in range(count):
    (top, left), (height, width) = rng.integers(2, 4, 2), rng.integers(5, 7, 2)
    fg[i, top:top + height, left:left + width] = True
  means = np.where(fg[..., None], fg_means[category][:, None, None], image_bg[:, None, None])
  patches = _unit(means + noise * rng.normal(size=means.shape) / np.sqrt(DIM))
  cls = _unit(_unit(rng.normal(size=(LEVEL_CATEGORIES, DIM)))[category] + 0.1 * rng.normal(size=(count, DIM)))
  attention = np.where(fg, 0.02, 0.005) + 0.003 * rng.random(fg.shape)
  features = framework.PatchFeatures(patches.astype(np.float32), cls.astype(np.float32),
                                     attention.astype(np.float32), np.ones(fg.shape, bool))
  return features, fg, affected


def _disable(monkeypatch, level):
  """Replaces a level by its parent in segment_features: its prototypes become the parent's."""
  from jaxseg.framework import levels
  if level == "category":
    monkeypatch.setattr(levels, "fit_category_prototypes", lambda samples, dataset, cfg: jax.numpy.broadcast_to(
        dataset.prototypes, (samples.points.shape[0], *dataset.prototypes.shape)))
  else:
    monkeypatch.setattr(levels, "image_prototypes", lambda features, parents, cfg: parents)
    traced = levels.level_margins.__wrapped__

    def level_margins(features, dataset, category_centroids, category_prototypes, cfg):
      return traced(features, dataset, category_centroids, category_prototypes, cfg)

    # level_margins is jitted and its trace cached: a new function is traced with the patched image_prototypes.
    monkeypatch.setattr(levels, "level_margins", jax.jit(level_margins, static_argnames=("cfg",)))


def _affected_ious(result, fg, affected):
  """IoU on the affected images of the dataset, category, image levels and the fused mask."""
  masks = [*np.asarray(result.level_masks), np.asarray(result.fg_mask)]
  return [iou(mask[affected], fg[affected]) for mask in masks]


@pytest.mark.parametrize("wrong_level", ["dataset", "category"])
def test_the_level_below_corrects_a_wrong_parent(wrong_level):
  """The planted mistake of wrong_level is undone by the level below it, and so by the vote.

  With that level replaced by its parent (fit_category_prototypes returning the dataset
  prototypes, or image_prototypes returning the category prototypes) it repeats the mistake
  and this test fails; test_a_disabled_level_scores_clearly_lower runs exactly that.
  """
  features, fg, affected = planted_wrong_parent(wrong_level)
  result = framework.segment_features(features, LEVEL_CFG, key=jax.random.key(0), batch_size=8)
  ious = _affected_ious(result, fg, affected)
  wrong = ("dataset", "category").index(wrong_level)
  assert ious[wrong] < 0.5, ious  # the planted mistake
  assert min(ious[:wrong] + ious[wrong + 1:]) >= 0.9, ious
  assert iou(result.fg_mask, fg) >= 0.9


@pytest.mark.parametrize("wrong_level, disabled", [("dataset", "category"), ("category", "image")])
def test_a_disabled_level_scores_clearly_lower(monkeypatch, wrong_level, disabled):
  features, fg, affected = planted_wrong_parent(wrong_level)
  _disable(monkeypatch, disabled)
  result = framework.segment_features(features, LEVEL_CFG, key=jax.random.key(0), batch_size=8)
  level = {"category": 1, "image": 2}[disabled]
  ious = _affected_ious(result, fg, affected)
  assert ious[level] < 0.5 and ious[3] < 0.5, ious  # the fused mask follows the uncorrected mistake


def test_vote_is_at_least_as_good_as_the_best_single_level():
  rng = np.random.default_rng(5)
  truth = np.zeros((40, GRID, GRID), bool)
  truth[:, 2:7, 3:8] = True
  # Each level: the right sign with independent noise, about 85% of patches right.
  margins = np.where(truth, 0.1, -0.1) + 0.1 * rng.normal(size=(3, *truth.shape))
  scores = framework.level_scores(margins, np.ones(truth.shape, bool), CFG.score_temperature)
  single = [iou(scores[level] > 0.5, truth) for level in range(3)]
  vote = framework.fuse(scores, "vote") > 0.5
  assert iou(vote, truth) >= max(single)
  level_masks = np.asarray(scores) > 0.5
  np.testing.assert_array_equal(vote, level_masks.sum(0) >= 2)
  np.testing.assert_array_equal(framework.fuse(scores, "intersection") > 0.5, level_masks.all(0))
  np.testing.assert_allclose(framework.fuse(scores, "mean"), np.asarray(scores).mean(0), rtol=1e-6)


def test_labeling_recovers_the_planted_classes(data, result):
  features, fg, category = data
  labels = framework.label_pooled(features.patches, list(np.asarray(result.fg_mask)), CFG, key=jax.random.key(2))
  truth = np.where(fg, category[:, None, None] + 1, 0)
  cm = sum(metrics.accumulate(None, metrics.confusion_matrix(pred, gt, NUM_CATEGORIES + 1, NUM_CATEGORIES + 1))
           for pred, gt in zip(labels, truth))
  assert metrics.hungarian_scores(cm)["miou"] >= 0.9


def _ellipse_scene(seed=3, height=61, width=83, grid=(8, 8)):
  """(image [H, W, 3] uint8 whose colour edges are the truth, truth [H, W] bool, noisy coarse fg_prob [grid])."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width]
  truth = (yy - 30) ** 2 / 18 ** 2 + (xx - 40) ** 2 / 25 ** 2 < 1
  image = np.where(truth[..., None], [200, 60, 40], [40, 90, 160]) + rng.integers(-10, 10, (height, width, 3))
  share = labeling.region_patch_fractions(truth.astype(np.int32), 1, grid)[0]
  fg_prob = np.clip(0.2 + 0.6 * share + 0.1 * rng.normal(size=share.shape), 0.01, 0.99).astype(np.float32)
  return np.clip(image, 0, 255).astype(np.uint8), truth, fg_prob


def test_refinement_snaps_to_colour_edges():
  image, truth, fg_prob = _ellipse_scene()
  coarse = np.asarray(framework.refine(image, fg_prob, framework.CRFConfig(iterations=0)))
  refined = np.asarray(framework.refine(image, fg_prob, CFG.crf))
  assert refined.shape == truth.shape
  assert iou(refined, truth) >= 0.9
  assert iou(refined, truth) > iou(coarse, truth)


def test_refinement_of_a_large_image_runs_downscaled():
  image, truth, fg_prob = _ellipse_scene()
  block = np.ones((4, 4), np.uint8)
  large = np.stack([np.kron(image[..., c], block) for c in range(3)], axis=-1)  # 244 x 332
  crf = dataclasses.replace(CFG.crf, max_side=83)  # refined at 61 x 83, the scene's own size
  assert framework.downscaled_size(large.shape[:2], 83) == image.shape[:2]
  refined = np.asarray(framework.refine(large, fg_prob, crf))
  small = np.asarray(framework.refine(image, fg_prob, dataclasses.replace(crf, max_side=0)))
  assert refined.shape == large.shape[:2]
  # The antialiased downscale blurs colour edges by about one block, so the two differ along the edge only.
  assert np.mean(refined == np.kron(small, block).astype(bool)) >= 0.95
  assert iou(refined, np.kron(truth, block).astype(bool)) >= 0.9


def test_refinement_matches_torch_upsampling_and_pydensecrf():
  torch = pytest.importorskip("torch")
  dcrf = pytest.importorskip("pydensecrf.densecrf")
  image, _, fg_prob = _ellipse_scene(seed=4, height=47, width=66, grid=(6, 5))
  height, width = image.shape[:2]
  reference_prob = torch.nn.functional.interpolate(torch.tensor(fg_prob)[None, None], size=(height, width),
                                                   mode="bilinear", align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(framework.upsample(fg_prob, (height, width)), reference_prob, atol=1e-6)
  crf = CFG.crf
  p = np.clip(reference_prob, 1e-5, 1 - 1e-5)
  model = dcrf.DenseCRF2D(width, height, 2)
  model.setUnaryEnergy(np.ascontiguousarray(-np.log(np.stack([1 - p, p]).reshape(2, -1)), np.float32))
  model.addPairwiseGaussian(sxy=crf.gaussian_sxy, compat=crf.gaussian_weight)
  model.addPairwiseBilateral(sxy=crf.bilateral_sxy, srgb=crf.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                             compat=crf.bilateral_weight)
  reference = np.argmax(np.array(model.inference(crf.iterations)).reshape(2, height, width), axis=0) == 1
  assert np.mean(np.asarray(framework.refine(image, fg_prob, crf)) == reference) >= 0.999


def test_border_patches_is_the_ring_of_the_valid_area():
  valid = np.zeros((2, 5, 6), bool)
  valid[0] = True
  valid[1, 1:4, 2:6] = True
  expected = np.zeros_like(valid)
  expected[0] = True
  expected[0, 1:4, 1:5] = False
  expected[1, 1:4, 2:6] = True
  expected[1, 2, 3:5] = False
  np.testing.assert_array_equal(framework.border_patches(valid), expected)


def test_foreground_clusters_rules():
  stats = framework.ClusterStats(count=np.array([100, 50, 0, 50]), border_count=np.array([60, 5, 0, 30]),
                                 attention_sum=np.array([1.0, 4.0, 0.0, 0.5]))
  # Border shares 0.6, 0.1, -, 0.6 against 0.475 overall; attention means 0.01, 0.08, -, 0.01 against 0.0275.
  np.testing.assert_array_equal(framework.foreground_clusters(stats, "border"), [False, True, False, False])
  np.testing.assert_array_equal(framework.foreground_clusters(stats, "attention"), [False, True, False, False])
  alike = framework.ClusterStats(np.array([10, 10]), np.array([2, 2]), np.array([1.0, 1.0]))
  assert framework.foreground_clusters(alike, "border").sum() == 1


def test_an_empty_dataset_cluster_gives_no_zero_prototype():
  rng = np.random.default_rng(4)
  centroids = _unit(rng.normal(size=(2, DIM))).astype(np.float32)
  # Every patch of the split went to cluster 0, so it is the foreground and cluster 1 is empty.
  stats = framework.ClusterStats(count=np.array([50, 0]), border_count=np.array([20, 0]),
                                 attention_sum=np.array([1.0, 0.0]))
  dataset = framework.dataset_level(centroids, stats, "border")
  np.testing.assert_array_equal(dataset.foreground, [True, False])
  np.testing.assert_allclose(dataset.prototypes, centroids[::-1], atol=1e-6)  # bg = the empty cluster's centroid
  patches = np.where(np.arange(GRID)[:, None] < 5, centroids[0], -centroids[0])[None, :, None, :]
  patches = np.broadcast_to(patches, (1, GRID, GRID, DIM)).astype(np.float32)
  features = framework.PatchFeatures(patches, centroids[:1], np.ones((1, GRID, GRID), np.float32),
                                     np.ones((1, GRID, GRID), bool))
  images = framework.image_prototypes(features, dataset.prototypes[None], CFG)
  np.testing.assert_allclose(np.linalg.norm(images, axis=-1), 1.0, rtol=1e-5)


def test_a_vanished_two_means_centroid_falls_back_to_the_parent():
  basis = np.eye(4, dtype=np.float32)
  parent = basis[:2]  # (bg, fg)
  # +e2 and -e2 tie between the parents and join the bg cluster, whose mean is zero.
  points = np.stack([basis[2], -basis[2], basis[1]])
  split = framework.split_from_parent(points, np.ones(3, bool), parent, CFG)
  np.testing.assert_allclose(split, parent, atol=1e-6)


def _alike_split(kind):
  """Features with no foreground at all: every patch the same vector, or every patch independent noise."""
  rng = np.random.default_rng(6)
  if kind == "identical":
    patches = np.broadcast_to(_unit(rng.normal(size=DIM)), (NUM_IMAGES, GRID, GRID, DIM))
    cls = np.broadcast_to(_unit(rng.normal(size=DIM)), (NUM_IMAGES, DIM))
  else:
    patches, cls = _unit(rng.normal(size=(NUM_IMAGES, GRID, GRID, DIM))), _unit(rng.normal(size=(NUM_IMAGES, DIM)))
  return framework.PatchFeatures(patches.astype(np.float32), cls.astype(np.float32),
                                 np.full((NUM_IMAGES, GRID, GRID), 0.01, np.float32),
                                 np.ones((NUM_IMAGES, GRID, GRID), bool))


@pytest.mark.parametrize("kind", ["identical", "noise"])
def test_a_split_where_every_cluster_looks_alike_gives_unit_prototypes(kind):
  result = framework.segment_features(_alike_split(kind), CFG, key=jax.random.key(0), batch_size=6)
  for name in ("dataset", "category_prototypes", "image_prototypes"):
    prototypes = result.dataset.prototypes if name == "dataset" else getattr(result, name)
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=-1), 1.0, rtol=1e-5, err_msg=name)
  assert np.isfinite(result.level_scores).all() and np.isfinite(result.fg_prob).all()


def test_patch_features_selects_and_normalises():
  rng = np.random.default_rng(0)
  out = dataclasses.make_dataclass("Out", ["cls", "patch_tokens", "q", "k", "v", "cls_attention"])(
      rng.normal(size=(2, 8)), *rng.normal(size=(4, 2, 3, 3, 8)), rng.random((2, 4, 3, 3)))
  valid = np.array([True, False])
  features = framework.patch_features(out, "v", valid)
  np.testing.assert_allclose(features.patches[0], _unit(out.v[0]), rtol=1e-5)
  np.testing.assert_array_equal(features.patches[1], 0)
  np.testing.assert_allclose(features.attention[0], out.cls_attention[0].mean(0), rtol=1e-5)
  np.testing.assert_allclose(features.cls, _unit(out.cls), rtol=1e-5)
  with pytest.raises(ValueError, match="feature"):
    framework.patch_features(out, "x")


def test_regions_boxes_and_label_map():
  mask = np.zeros((7, 9), bool)
  mask[1:3, 1:4] = True  # 6 pixels
  mask[5, 7] = True  # 1 pixel
  mask[4:7, 0:2] = True  # 6 pixels
  whole, count = framework.regions(mask, 0)
  assert count == 1 and np.array_equal(whole, mask)
  region_map, count = framework.regions(mask, min_region_area=2)
  assert count == 2 and region_map[5, 7] == 0
  assert {region_map[1, 1], region_map[5, 0]} == {1, 2}
  boxes = framework.region_boxes(region_map, count)
  for index, box in enumerate(boxes):
    ys, xs = np.nonzero(region_map == index + 1)
    np.testing.assert_array_equal(box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
  image = np.arange(7 * 9 * 3).reshape(7, 9, 3)
  assert framework.crop(image, boxes[0]).shape == (boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1], 3)
  labels = framework.label_map(region_map, np.array([4, 0]))
  np.testing.assert_array_equal(labels, np.where(region_map == 1, 5, np.where(region_map == 2, 1, 0)))
  assert labels.dtype == np.uint8


def test_regions_by_fraction_of_the_image_area():
  mask = np.zeros((10, 10), bool)
  mask[0:2, 0:3] = True  # 6 pixels = 6% of the image
  mask[4:9, 3:9] = True  # 30 pixels = 30%
  region_map, count = framework.regions(mask, min_region_fraction=0.1)
  assert count == 1 and np.array_equal(region_map, np.where(mask & (np.arange(10)[:, None] >= 4), 1, 0))
  assert framework.regions(mask, min_region_fraction=0.05)[1] == 2
  assert framework.regions(mask, 7, 0.05)[1] == 1  # the larger of the two thresholds
  # A fraction means the same at 3x the resolution; a pixel count does not.
  large = np.kron(mask, np.ones((3, 3), bool))
  large_map, large_count = framework.regions(large, min_region_fraction=0.1)
  assert large_count == 1 and np.array_equal(large_map, np.kron(region_map, np.ones((3, 3), np.int32)))
  assert framework.regions(large, min_region_area=10)[1] == 2


def _pixels_of_patch(index, size, cells):
  """Pixel indices along one axis that fall in patch `index` of `cells` (by pixel centre), or its centre pixel."""
  if size >= cells:
    return [y for y in range(size) if int((y + 0.5) * cells / size) == index]
  return [int((index + 0.5) * size / cells)]


@pytest.mark.parametrize("shape", [(13, 17), (3, 2), (1, 1), (13, 2)])
def test_region_patch_fractions_against_a_pixel_loop(shape):
  rng = np.random.default_rng(1)
  region_map = rng.integers(0, 3, shape)
  grid = (4, 5)
  fractions = framework.region_patch_fractions(region_map, 2, grid)
  expected = np.zeros((2, *grid))
  for i in range(grid[0]):
    for j in range(grid[1]):
      values = region_map[np.ix_(_pixels_of_patch(i, shape[0], grid[0]), _pixels_of_patch(j, shape[1], grid[1]))]
      expected[:, i, j] = [(values == r + 1).mean() for r in range(2)]
  np.testing.assert_allclose(fractions, expected, rtol=1e-6)
  masks = framework.region_patch_masks(fractions)
  assert masks.any(axis=(1, 2)).all()
  np.testing.assert_array_equal(masks | ~(fractions >= 0.5), True)


def test_pooled_descriptors_are_weighted_means():
  rng = np.random.default_rng(2)
  patches = rng.normal(size=(3, 4, 5))
  fractions = rng.random((2, 3, 4))
  expected = _unit(np.einsum("rhw,hwd->rd", fractions, patches) / fractions.sum((1, 2))[:, None])
  np.testing.assert_allclose(framework.pooled_descriptors(patches, fractions), expected, rtol=1e-5)


def test_config_from_mappings_and_validation():
  cfg = framework.MethodConfig.from_mappings(dict(feature="q", num_classes=80), dict(iterations=3))
  assert cfg.feature == "q" and cfg.num_classes == 80 and cfg.crf.iterations == 3
  hash(cfg)
  with pytest.raises(ValueError, match="featur"):
    framework.MethodConfig.from_mappings(dict(featur="q"))
  with pytest.raises(ValueError, match="fusion"):
    framework.MethodConfig(fusion="union")
  with pytest.raises(ValueError, match="min_region_fraction"):
    framework.MethodConfig(min_region_fraction=1.0)
  with pytest.raises(ValueError, match="num_categories"):
    framework.fit_categories(np.ones((2, 4), np.float32), CFG, key=jax.random.key(0))

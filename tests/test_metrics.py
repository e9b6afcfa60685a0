"""Metrics against direct numpy computations: np.add.at counts, brute-force matchings, per-pixel IoU."""

import itertools

import jax
import numpy as np
import pytest

from jaxseg import metrics

IGNORE = 255


def _random_labels(rng, num_pred, num_gt, shape=(17, 23)):
  pred = rng.integers(0, num_pred, shape)
  gt = rng.integers(0, num_gt, shape)
  gt[rng.random(shape) < 0.15] = IGNORE
  gt[0, :3] = num_gt + 3  # out of range: not counted
  # Correlate the two so matchings are not arbitrary.
  copy = rng.random(shape) < 0.4
  gt[copy] = pred[copy] % num_gt
  return pred, gt


def _numpy_confusion(pred, gt, num_pred, num_gt):
  cm = np.zeros((num_pred, num_gt), np.int64)
  counted = (gt >= 0) & (gt < num_gt)
  np.add.at(cm, (pred[counted], gt[counted]), 1)
  return cm


def _pixel_ious(pred, gt, assignment, num_gt):
  """IoU per class straight from the pixels, with pred relabelled by assignment."""
  counted = (gt >= 0) & (gt < num_gt)
  mapped = np.asarray(assignment)[pred]
  ious, present = [], []
  for c in range(num_gt):
    inter = np.sum((mapped == c) & (gt == c) & counted)
    union = np.sum(((mapped == c) | (gt == c)) & counted)
    present.append(np.sum((gt == c) & counted) > 0)
    ious.append(inter / union if union else 0.0)
  accuracy = np.sum((mapped == gt) & counted) / np.sum(counted)
  return np.array(ious), np.array(present), accuracy


def _injective_maps(num_pred, num_gt):
  """Every one-to-one partial map cluster -> class that matches min(P, G) pairs, as [P] arrays."""
  if num_pred >= num_gt:
    for clusters in itertools.permutations(range(num_pred), num_gt):
      assignment = np.full(num_pred, -1)
      assignment[list(clusters)] = np.arange(num_gt)
      yield assignment
  else:
    for classes in itertools.permutations(range(num_gt), num_pred):
      yield np.array(classes)


@pytest.mark.parametrize("num_pred,num_gt", [(4, 4), (6, 4), (3, 5), (1, 3)])
def test_confusion_matrix_matches_add_at(num_pred, num_gt):
  pred, gt = _random_labels(np.random.default_rng(num_pred * 10 + num_gt), num_pred, num_gt)
  cm = metrics.confusion_matrix(pred, gt, num_pred, num_gt)
  assert cm.dtype == np.int32 and cm.shape == (num_pred, num_gt)
  np.testing.assert_array_equal(cm, _numpy_confusion(pred, gt, num_pred, num_gt))
  jitted = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))
  np.testing.assert_array_equal(jitted(pred, gt, num_pred, num_gt), cm)


def test_confusion_matrix_rejects_bad_input():
  with pytest.raises(ValueError, match="num_pred=3"):
    metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3, 2)
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 3, 2)


@pytest.mark.parametrize("num_pred,num_gt", [(4, 4), (6, 4), (3, 5)])
@pytest.mark.parametrize("matching", ["pixels", "iou"])
def test_hungarian_scores_match_brute_force(num_pred, num_gt, matching):
  pred, gt = _random_labels(np.random.default_rng(7 * num_pred + num_gt), num_pred, num_gt)
  cm = metrics.confusion_matrix(pred, gt, num_pred, num_gt)
  scores = metrics.hungarian_scores(cm, matching=matching)

  def objective(assignment):
    if matching == "pixels":
      counted = (gt >= 0) & (gt < num_gt)
      return np.sum((assignment[pred] == gt) & counted)
    return _pixel_ious(pred, gt, assignment, num_gt)[0][assignment[assignment >= 0]].sum()

  best = max(objective(a) for a in _injective_maps(num_pred, num_gt))
  assignment = scores["assignment"]
  assert sorted(assignment[assignment >= 0]) == sorted(set(assignment[assignment >= 0]))  # one-to-one
  assert np.sum(assignment >= 0) == min(num_pred, num_gt)
  np.testing.assert_allclose(objective(assignment), best)

  ious, present, accuracy = _pixel_ious(pred, gt, assignment, num_gt)
  np.testing.assert_allclose(scores["per_class_iou"], ious)
  np.testing.assert_array_equal(scores["present"], present)
  np.testing.assert_allclose(scores["miou"], ious[present].mean())
  np.testing.assert_allclose(scores["pixel_accuracy"], accuracy)
  assert 0 <= scores["miou"] <= 1 and 0 <= scores["pixel_accuracy"] <= 1
  assert scores["matched_cm"].sum() == np.sum(((gt >= 0) & (gt < num_gt)) & (assignment[pred] >= 0))


def test_absent_class_is_excluded_from_the_mean():
  pred = np.array([0, 0, 1, 1, 2])
  gt = np.array([0, 0, 1, 1, 1])  # class 2 never occurs
  scores = metrics.hungarian_scores(metrics.confusion_matrix(pred, gt, 3, 3))
  np.testing.assert_array_equal(scores["present"], [True, True, False])
  assert not np.isnan(scores["per_class_iou"]).any()
  np.testing.assert_allclose(scores["per_class_iou"][:2], [1.0, 2 / 3])
  np.testing.assert_allclose(scores["miou"], (1.0 + 2 / 3) / 2)


def test_scores_for_assignment_many_to_one():
  pred = np.array([0, 1, 2, 2])
  gt = np.array([0, 0, 1, 0])
  cm = metrics.confusion_matrix(pred, gt, 3, 2)
  assignment = np.array([0, 0, -1])
  scores = metrics.scores_for_assignment(cm, assignment)
  ious, present, accuracy = _pixel_ious(pred, gt, assignment, 2)
  np.testing.assert_allclose(scores["per_class_iou"], ious)
  np.testing.assert_allclose(scores["pixel_accuracy"], accuracy)
  with pytest.raises(ValueError, match="assignment"):
    metrics.scores_for_assignment(cm, np.array([0, 2, -1]))


def test_accumulate_does_not_overflow():
  big = np.full((2, 3), 2**30 + 7, np.int32)
  total = None
  for _ in range(8):
    total = metrics.accumulate(total, big)
  assert total.dtype == np.int64
  np.testing.assert_array_equal(total, np.full((2, 3), 8 * (2**30 + 7), np.int64))
  scores = metrics.hungarian_scores(total)
  assert 0 <= scores["miou"] <= 1
  with pytest.raises(ValueError, match="shape"):
    metrics.accumulate(total, np.zeros((3, 2), np.int32))
  with pytest.raises(ValueError, match="integers"):
    metrics.accumulate(None, np.zeros(2, np.float32))


def test_foreground_counts_and_iou():
  rng = np.random.default_rng(3)
  total = None
  inter = union = 0
  for _ in range(3):
    gt = rng.integers(0, 4, (9, 11))
    gt[rng.random(gt.shape) < 0.2] = IGNORE
    pred_fg = rng.random(gt.shape) < 0.5
    total = metrics.accumulate(total, metrics.foreground_counts(pred_fg, gt))
    counted = gt != IGNORE
    gt_fg = (gt > 0) & counted
    inter += np.sum(pred_fg & gt_fg)
    union += np.sum((pred_fg & counted) | gt_fg)
  np.testing.assert_array_equal(total, [inter, union])
  np.testing.assert_allclose(metrics.foreground_iou(total), inter / union)
  assert metrics.foreground_iou([0, 0]) == 1.0


@pytest.mark.parametrize("num_pred,num_gt", [(3, 3), (4, 3), (2, 4)])
def test_per_image_scores_match_brute_force(num_pred, num_gt):
  """Per image: the pixel-maximising one-to-one map found by enumeration; then IoU straight from the pixels."""
  rng = np.random.default_rng(num_pred * 10 + num_gt)
  images = [_random_labels(rng, num_pred, num_gt, shape=(9, 11)) for _ in range(4)]
  # Image-specific relabelling, so that one matching for the split cannot serve every image.
  images = [((pred + i) % num_pred, gt) for i, (pred, gt) in enumerate(images)]
  mapped, truth = [], []
  for pred, gt in images:
    counted = (gt >= 0) & (gt < num_gt)
    best = max(_injective_maps(num_pred, num_gt), key=lambda a: np.sum((a[pred] == gt) & counted))
    mapped.append(best[pred].ravel())
    truth.append(gt.ravel())
  mapped, truth = np.concatenate(mapped), np.concatenate(truth)
  counted = (truth >= 0) & (truth < num_gt)
  ious, present = [], []
  for c in range(num_gt):
    union = np.sum(((mapped == c) | (truth == c)) & counted)
    ious.append(np.sum((mapped == c) & (truth == c) & counted) / union if union else 0.0)
    present.append(np.sum((truth == c) & counted) > 0)
  ious, present = np.array(ious), np.array(present)

  cms = np.stack([np.asarray(metrics.confusion_matrix(p, g, num_pred, num_gt)) for p, g in images])
  scores = metrics.per_image_scores(cms)
  np.testing.assert_allclose(scores["per_class_iou"], ious)
  np.testing.assert_array_equal(scores["present"], present)
  np.testing.assert_allclose(scores["miou"], ious[present].mean())
  np.testing.assert_allclose(scores["pixel_accuracy"], np.sum((mapped == truth) & counted) / np.sum(counted))
  assert scores["pixel_accuracy"] >= metrics.hungarian_scores(cms.sum(0))["pixel_accuracy"]


def test_per_image_scores_rejects_a_single_matrix():
  with pytest.raises(ValueError, match=r"\[N, P, G\]"):
    metrics.per_image_scores(np.ones((3, 3), np.int64))

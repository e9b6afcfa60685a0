"""Confusion matrix, Hungarian matching and mIoU.

Per image, `confusion_matrix` and `foreground_counts` are jittable and return
int32 counts (one image cannot overflow int32). Over a split the totals can
(COCO: ~3.5e10 pixels) and JAX without x64 has no int64, so totals are summed
on the host with `accumulate`, which keeps numpy int64:

    total = None
    for pred, gt in images:
      total = accumulate(total, confusion_matrix(pred, gt, num_pred, num_gt))
    scores = hungarian_scores(total)
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

MATCHINGS = ("pixels", "iou")


def _is_concrete(*arrays: Any) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def confusion_matrix(pred: jax.Array, gt: jax.Array, num_pred: int, num_gt: int,
                     ignore_index: int = 255) -> jax.Array:
  """Counts pixels per (predicted cluster, ground-truth class).

  Args:
    pred: [...] int, predicted cluster per pixel, in [0, num_pred).
    gt: [...] int, same shape, ground-truth class per pixel; pixels equal to
      ignore_index or outside [0, num_gt) are not counted.
    num_pred: number of predicted clusters (static).
    num_gt: number of ground-truth classes (static).
    ignore_index: label of pixels to ignore.

  Returns:
    [num_pred, num_gt] int32 counts; rows = predicted cluster, columns = class.

  Raises:
    ValueError: shapes differ, or (when called outside jit) a predicted label is
      outside [0, num_pred): such pixels would otherwise vanish from the counts.
  """
  if jnp.shape(pred) != jnp.shape(gt):
    raise ValueError(f"confusion_matrix: pred shape {jnp.shape(pred)} != gt shape {jnp.shape(gt)}")
  if _is_concrete(pred):
    pred_np = np.asarray(pred)
    if pred_np.size and (pred_np.min() < 0 or pred_np.max() >= num_pred):
      raise ValueError(f"confusion_matrix: predicted labels span [{pred_np.min()}, {pred_np.max()}], "
                       f"outside [0, num_pred={num_pred})")
  return _confusion_matrix(jnp.asarray(pred), jnp.asarray(gt), num_pred, num_gt, ignore_index)


@jax.jit(static_argnames=("num_pred", "num_gt", "ignore_index"))
def _confusion_matrix(pred, gt, num_pred, num_gt, ignore_index):
  pred = pred.reshape(-1).astype(jnp.int32)
  gt = gt.reshape(-1).astype(jnp.int32)
  counted = (gt != ignore_index) & (gt >= 0) & (gt < num_gt) & (pred >= 0) & (pred < num_pred)
  # Uncounted pixels go to one extra bin that is dropped.
  index = jnp.where(counted, pred * num_gt + gt, num_pred * num_gt)
  counts = jnp.bincount(index, length=num_pred * num_gt + 1)
  return counts[:-1].reshape(num_pred, num_gt).astype(jnp.int32)


@jax.jit(static_argnames=("ignore_index",))
def foreground_counts(pred_fg: jax.Array, gt: jax.Array, ignore_index: int = 255) -> jax.Array:
  """Class-agnostic foreground intersection and union of one image.

  Args:
    pred_fg: [...] bool, predicted foreground.
    gt: [...] int, same shape; foreground = label not 0 and not ignore_index;
      pixels equal to ignore_index are not counted.
    ignore_index: label of pixels to ignore.

  Returns:
    [2] int32: (intersection, union) pixel counts; accumulate with `accumulate`
    and score with `foreground_iou`.
  """
  counted = gt != ignore_index
  gt_fg = counted & (gt != 0)
  pred_fg = counted & pred_fg.astype(bool)
  return jnp.stack([jnp.sum(pred_fg & gt_fg), jnp.sum(pred_fg | gt_fg)]).astype(jnp.int32)


def foreground_iou(counts: Any) -> float:
  """IoU from accumulated (intersection, union) counts [2]; 1.0 when both masks are empty."""
  intersection, union = (int(c) for c in np.asarray(counts))
  return intersection / union if union else 1.0


def accumulate(total: np.ndarray | None, counts: Any) -> np.ndarray:
  """Returns total + counts as numpy int64 (a new array); total=None starts a sum.

  Raises:
    ValueError: shapes differ, or counts are negative or not integral.
  """
  counts = np.asarray(counts)
  if not np.issubdtype(counts.dtype, np.integer):
    raise ValueError(f"accumulate: counts must be integers, got dtype {counts.dtype}")
  if counts.size and counts.min() < 0:
    raise ValueError("accumulate: counts must be >= 0 (an int32 overflow upstream?)")
  if total is None:
    return counts.astype(np.int64)
  if np.shape(total) != counts.shape:
    raise ValueError(f"accumulate: total shape {np.shape(total)} != counts shape {counts.shape}")
  return np.asarray(total, np.int64) + counts.astype(np.int64)


def _iou_matrix(cm: np.ndarray) -> np.ndarray:
  """[P, G] IoU of every (cluster, class) pair; 0 where both are empty."""
  union = cm.sum(1, keepdims=True) + cm.sum(0, keepdims=True) - cm
  return np.divide(cm, union, out=np.zeros(cm.shape), where=union > 0)


def hungarian_assignment(cm: Any, matching: str = "pixels") -> np.ndarray:
  """One-to-one matching of predicted clusters to classes.

  Args:
    cm: [P, G] counts, rows = predicted cluster, columns = class. P may differ
      from G (over- or under-clustering).
    matching: "pixels" maximises the matched pixel count (sum of cm over the
      matched pairs); "iou" maximises the sum of the matched pairs' IoU.

  Returns:
    [P] int64, the class of each cluster; -1 for the max(P - G, 0) unmatched.
  """
  cm = np.asarray(cm, np.float64)
  if cm.ndim != 2:
    raise ValueError(f"hungarian_assignment: cm must be 2-D [P, G], got shape {cm.shape}")
  if matching not in MATCHINGS:
    raise ValueError(f"hungarian_assignment: matching={matching!r}, expected one of {MATCHINGS}")
  weight = cm if matching == "pixels" else _iou_matrix(cm)
  rows, cols = scipy.optimize.linear_sum_assignment(weight, maximize=True)
  assignment = np.full(cm.shape[0], -1, np.int64)
  assignment[rows] = cols
  return assignment


def scores_for_assignment(cm: Any, assignment: Any) -> dict[str, Any]:
  """Scores a confusion matrix under a given cluster -> class mapping.

  Use it to score one image with the matching found on the whole split.

  Args:
    cm: [P, G] counts, rows = predicted cluster, columns = class.
    assignment: [P] int, class of each cluster, -1 = unmatched (its pixels are
      wrong for every class). Several clusters may map to one class.

  Returns:
    dict with
      miou: float, mean IoU over the classes present (ground-truth pixels > 0);
        0.0 when no class is present.
      pixel_accuracy: float, correctly labelled / counted pixels (1.0 if none).
      per_class_iou: [G] float64; 0.0 for classes not present (see `present`).
      present: [G] bool, the class has ground-truth pixels.
      assignment: [P] int64, as given.
      matched_cm: [G, G] int64, rows = class the prediction was mapped to,
        columns = ground truth; pixels of unmatched clusters are in no row.
  """
  cm = np.asarray(cm)
  assignment = np.asarray(assignment, np.int64)
  num_pred, num_gt = cm.shape
  if assignment.shape != (num_pred,):
    raise ValueError(f"scores_for_assignment: assignment shape {assignment.shape} != ({num_pred},)")
  if assignment.size and (assignment.min() < -1 or assignment.max() >= num_gt):
    raise ValueError(f"scores_for_assignment: assignment values must be in [-1, {num_gt})")
  matched_cm = np.zeros((num_gt, num_gt), np.int64)
  matched = assignment >= 0
  np.add.at(matched_cm, assignment[matched], cm[matched].astype(np.int64))
  return dict(_scores_from_matched(matched_cm, cm.sum(0).astype(np.int64), int(cm.sum())),
              assignment=assignment, matched_cm=matched_cm)


def _scores_from_matched(matched_cm: np.ndarray, gt_pixels: np.ndarray, total: int) -> dict[str, Any]:
  """miou, pixel_accuracy, per_class_iou, present from a matched [G, G] matrix and the [G] ground-truth pixels.

  gt_pixels includes the pixels of unmatched clusters, which are in no row of matched_cm.
  """
  true_positive = np.diag(matched_cm)
  union = gt_pixels + matched_cm.sum(1) - true_positive
  present = gt_pixels > 0
  per_class_iou = np.divide(true_positive, union, out=np.zeros(len(gt_pixels)), where=present)
  return dict(
      miou=float(per_class_iou[present].mean()) if present.any() else 0.0,
      pixel_accuracy=float(true_positive.sum() / total) if total else 1.0,
      per_class_iou=per_class_iou,
      present=present,
  )


def hungarian_scores(cm: Any, *, matching: str = "pixels") -> dict[str, Any]:
  """Hungarian matching of clusters to classes, then mIoU and pixel accuracy.

  Args:
    cm: [P, G] counts over the whole split (e.g. from `accumulate`), rows =
      predicted cluster, columns = class. With P > G the P - G unmatched
      clusters count as wrong; with P < G unmatched classes get IoU 0.
    matching: "pixels" (maximise matched pixels) or "iou" (maximise summed IoU).

  Returns:
    The dict of `scores_for_assignment` (miou, pixel_accuracy, per_class_iou,
    present, assignment, matched_cm) for the Hungarian assignment.
  """
  return scores_for_assignment(cm, hungarian_assignment(cm, matching))


def per_image_scores(cms: Any, *, matching: str = "pixels") -> dict[str, Any]:
  """The per-image matching protocol: Hungarian matching inside each image, scored over the split.

  Some papers match clusters to classes per image rather than once for the
  dataset; this is their number, for comparison only. Each image's clusters
  are matched to its classes on its own confusion matrix; the matched pixels
  of all images are summed into one [G, G] matrix, scored as `hungarian_scores`
  scores the split's. Its pixel accuracy is at least the split-level one (each
  image's matching maximises its own matched pixels), so it is reported apart
  from the dataset-level Hungarian mIoU, never in its place.

  Args:
    cms: [N, P, G] per-image counts (rows = predicted cluster, columns = class).
    matching: "pixels" or "iou", per image.

  Returns:
    dict with miou, pixel_accuracy, per_class_iou [G], present [G] (as
    `scores_for_assignment`) and matched_cm [G, G] int64.
  """
  cms = np.asarray(cms)
  if cms.ndim != 3:
    raise ValueError(f"per_image_scores: cms must be [N, P, G], got shape {cms.shape}")
  num_gt = cms.shape[2]
  matched_cm = np.zeros((num_gt, num_gt), np.int64)
  for cm in cms:
    matched_cm += scores_for_assignment(cm, hungarian_assignment(cm, matching))["matched_cm"]
  return dict(_scores_from_matched(matched_cm, cms.sum((0, 1)).astype(np.int64), int(cms.sum())),
              matched_cm=matched_cm)

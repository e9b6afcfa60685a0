"""Stage 7, the report pass: metrics.json from the predictions and masks on disk, and the gallery.

    metrics.json   mIoU, pixel accuracy, per-class IoU (labelled splits), fg IoU per level, fg fraction,
                   "per_image_matching" (clusters matched per image, apart from the dataset-level mIoU),
                   seconds per pass, the config, and "effective": the num_categories / num_classes used
    gallery.html, gallery/*.png   experiments/passes/gallery.py

It always runs (it is cheap and shows the current config and timings); it reads only what the passes wrote.
"""

import json

import numpy as np
import tqdm

import jaxseg.data
from experiments import common
from experiments.passes import gallery
from experiments.passes import labeling
from experiments.passes.context import RunContext
from experiments.passes.refinement import FG_LEVELS
from jaxseg import metrics

NAME = "report"
PER_IMAGE_NOTE = ("clusters matched to classes inside each image (for comparison with papers that do so); "
                  "not the dataset-level mIoU above")


def fields(ctx: RunContext) -> dict:
  del ctx
  return {}


def run(ctx: RunContext) -> None:
  stats = [ctx.load(ctx.path("fg_stats", c), "counts", "has_gt", "fg_pixels", "pixels", "index")
           for c in range(ctx.num_chunks)]
  order = np.concatenate([s["index"] for s in stats])
  keep = order >= 0
  counts, has_gt, fg_pixels, pixels = (np.concatenate([s[k] for s in stats])[keep]
                                       for k in ("counts", "has_gt", "fg_pixels", "pixels"))
  order = order[keep]
  skipped = [str(path) for path in getattr(ctx.source, "skipped", [])]  # unreadable files of an image folder
  result = dict(num_images=int(keep.sum()), skipped={"count": len(skipped), "files": skipped},
                fg_fraction={level: float(fg_pixels[:, i].sum() / max(pixels.sum(), 1))
                             for i, level in enumerate(FG_LEVELS)})
  per_image_iou = None
  if has_gt.any():
    total = counts[has_gt].sum(axis=0)  # [levels, 2]
    result["fg_iou_levels"] = {level: metrics.foreground_iou(total[i]) for i, level in enumerate(FG_LEVELS)}
    result["fg_iou"] = result["fg_iou_levels"]["refined"]
    refined = counts[:, -1]
    per_image_iou = np.where(refined[:, 1] > 0, refined[:, 0] / np.maximum(refined[:, 1], 1), 1.0)
    result.update(_semantic_scores(ctx, order[has_gt]))
  timings = dict(ctx.timings)
  result["seconds"] = timings
  result["seconds_per_image"] = {k: v / max(result["num_images"], 1) for k, v in timings.items()}
  result["effective"] = {**ctx.effective, "num_classes": labeling.num_classes_used(ctx)}
  result["config"] = json.loads(ctx.config.to_json())
  if ctx.shared is not None:  # one seed of config.seeds (its levels, masks and labels; the run's features)
    result["seed"] = ctx.seed
  gallery.write(ctx, order, per_image_iou, result.get("assignment"))
  common.save_json(ctx.workdir / "metrics.json", result)


def _semantic_scores(ctx: RunContext, indices: np.ndarray) -> dict:
  names = jaxseg.data.class_names(ctx.config.data.name)
  cms = []  # [P, G] per image: their sum scores the dataset-level matching, each one the per-image matching
  for index in tqdm.tqdm(indices, desc="evaluation", unit="image"):
    pred = common.read_png_indices(ctx.image_path("predictions", ctx.ids[int(index)]))
    gt = ctx.source[int(index)]["mask"]
    cms.append(np.asarray(metrics.confusion_matrix(pred, gt, ctx.method.num_classes + 1, len(names)), np.int64))
  cms = np.stack(cms)
  scores = metrics.hungarian_scores(cms.sum(axis=0))
  per_image = metrics.per_image_scores(cms)
  return dict(miou=float(scores["miou"]), pixel_accuracy=float(scores["pixel_accuracy"]),
              per_class_iou=_per_class(names, scores), assignment=np.asarray(scores["assignment"]).tolist(),
              per_image_matching=dict(miou=float(per_image["miou"]), pixel_accuracy=float(per_image["pixel_accuracy"]),
                                      per_class_iou=_per_class(names, per_image), note=PER_IMAGE_NOTE))


def _per_class(names: list[str], scores: dict) -> dict[str, float]:
  """{class name: IoU} of the classes present in the ground truth."""
  return {name: float(iou) for name, iou, p in zip(names, scores["per_class_iou"], np.asarray(scores["present"]))
          if p}

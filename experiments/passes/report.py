"""Stage 7, the report pass: metrics.json from the predictions and masks on disk, and the gallery.

    metrics.json   mIoU, pixel accuracy, per-class IoU (labelled splits), fg IoU per level, fg fraction,
                   seconds per pass, the config, and "effective": the num_categories / num_classes used
    gallery.html, gallery/*.png   the worst images first (by foreground IoU)

It always runs (it is cheap and shows the current config and timings); it reads only what the passes wrote.
"""

import json
import shutil

import numpy as np
import tqdm

import jaxseg.data
from experiments import common
from experiments.passes import labeling
from experiments.passes.context import RunContext
from experiments.passes.refinement import FG_LEVELS
from jaxseg import metrics
from jaxseg import viz

NAME = "report"


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
  result = dict(num_images=int(keep.sum()),
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
  _write_gallery(ctx, order, per_image_iou)
  common.save_json(ctx.workdir / "metrics.json", result)


def _semantic_scores(ctx: RunContext, indices: np.ndarray) -> dict:
  names = jaxseg.data.class_names(ctx.config.data.name)
  total = None
  for index in tqdm.tqdm(indices, desc="evaluation", unit="image"):
    pred = common.read_png_indices(ctx.image_path("predictions", ctx.ids[int(index)]))
    gt = ctx.source[int(index)]["mask"]
    total = metrics.accumulate(total, metrics.confusion_matrix(pred, gt, ctx.method.num_classes + 1, len(names)))
  scores = metrics.hungarian_scores(total)
  present = np.asarray(scores["present"])
  return dict(miou=float(scores["miou"]), pixel_accuracy=float(scores["pixel_accuracy"]),
              per_class_iou={name: float(iou) for name, iou, p in zip(names, scores["per_class_iou"], present) if p},
              assignment=np.asarray(scores["assignment"]).tolist())


def _write_gallery(ctx: RunContext, order: np.ndarray, per_image_iou: np.ndarray | None) -> None:
  """gallery.html with the worst images first (by foreground IoU) and gallery/*.png overlays."""
  if per_image_iou is not None:
    chosen = np.argsort(per_image_iou, kind="stable")[:ctx.config.gallery_size]
  else:
    chosen = np.arange(min(len(order), ctx.config.gallery_size))
  shutil.rmtree(ctx.workdir / "gallery", ignore_errors=True)  # no thumbnails of an earlier state
  rows = []
  for rank, position in enumerate(chosen):
    item = ctx.source[int(order[position])]
    pred = common.read_png_indices(ctx.image_path("predictions", item["id"]))
    panels = {"image": item["image"], "prediction": viz.overlay(item["image"], pred)}
    if "mask" in item:
      panels["truth"] = viz.overlay(item["image"], item["mask"])
    files = []
    for name in ("image", "truth", "prediction"):
      if name in panels:
        files.append(f"gallery/{rank:04d}_{name}.png")
        common.save_png(ctx.workdir / files[-1], _thumbnail(panels[name]))
    score = None if per_image_iou is None else float(per_image_iou[position])
    rows.append(viz.GalleryRow(item["id"], score, files))
  columns = ("image", "ground truth", "prediction") if per_image_iou is not None else ("image", "prediction")
  html = viz.gallery_html(rows, columns, title=f"jaxseg: {ctx.config.data.name} {ctx.config.data.split}, "
                          "worst foreground IoU first")
  common.atomic_write_bytes(ctx.workdir / "gallery.html", html.encode())


def _thumbnail(image: np.ndarray, side: int = 320) -> np.ndarray:
  """Shrinks image [H, W, 3] so its longer side is at most `side` pixels (nearest, keeps label colours)."""
  step = max(1, -(-max(image.shape[:2]) // side))
  return image[::step, ::step]

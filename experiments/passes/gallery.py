"""The report's gallery: gallery.html and gallery/*.png panels, saying only what the run can support.

    panels   per row the image, beside it the prediction in solid colours with background (label 0) in a
             neutral grey (viz.NEUTRAL), then the ground truth painted the same way where there is one;
             each shown viz.PANEL_SIDE px on its longer side.
    notes    per row the foreground share of the prediction, and its foreground IoU with the ground truth.
    order    worst foreground IoU first where the split has ground truth (a score per image), otherwise by
             image id; the title says which.
    colours  with ground truth, each predicted label is painted in the colour of the class the Hungarian
             matching (metrics.json "assignment") gave it, the colour that class has in the truth column;
             a label matched to no class gets a colour beyond the class colours. Without ground truth the
             prediction label L (the value in predictions/<id>.png, 1 + k-means cluster) keeps colour L.
    legend   numbered as the palette: "0: background", then one entry per colour in the shown predictions:
             "15: person (cluster 2)", "22: cluster 3 (unmatched)" or "2: cluster 2", a cluster being named
             by its prediction label.
    banner   with model.weights == "random": the masks are meaningless.
"""

import shutil
from collections.abc import Sequence

import numpy as np

import jaxseg.data
from experiments import common
from experiments.passes.context import RunContext
from jaxseg import viz

RANDOM_WEIGHTS_BANNER = "randomly initialised ViT (model.weights=random): meaningless masks, a smoke run only"


def colour_map(assignment: Sequence[int] | None, num_labels: int, num_class_names: int) -> np.ndarray:
  """[num_labels] int: the palette index each prediction label is painted with.

  Args:
    assignment: [P] class index of each prediction label (-1 unmatched), or None without ground truth.
    num_labels: prediction labels 0..num_labels-1 (0 = background).
    num_class_names: classes of the dataset; unmatched labels get palette indices from there on.
  """
  if assignment is None:
    return np.arange(num_labels)
  assignment = np.asarray(assignment, np.int64)
  colours = np.full(num_labels, -1, np.int64)
  colours[:len(assignment)] = assignment[:num_labels]
  unmatched = np.flatnonzero(colours < 0)
  colours[unmatched] = num_class_names + np.arange(len(unmatched))  # distinct from every class colour
  if colours.max(initial=0) >= len(viz.VOC_PALETTE) - 1:  # 255 is the void colour
    raise ValueError(f"gallery: {num_class_names} classes and {len(unmatched)} unmatched labels exceed the palette")
  return colours


def legend(labels: np.ndarray, colours: np.ndarray, names: Sequence[str] | None) -> list[tuple[int, str]]:
  """(palette index, name): background first, then one per coloured prediction label in `labels`."""
  entries = []
  for label in np.unique(labels):
    colour = int(colours[label])
    if label == 0 or colour == 0:
      continue  # background, listed first
    cluster = f"cluster {int(label)}"
    if names is None:
      entries.append((colour, cluster))
    elif colour < len(names):
      entries.append((colour, f"{names[colour]} ({cluster})"))
    else:
      entries.append((colour, f"{cluster} (unmatched)"))
  return [(0, "background")] + sorted(entries)


def write(ctx: RunContext, order: np.ndarray, per_image_iou: np.ndarray | None,
          assignment: Sequence[int] | None = None) -> None:
  """Writes gallery.html and gallery/*.png.

  Args:
    ctx: the run context.
    order: [N] source index of each run image.
    per_image_iou: [N] foreground IoU per image, or None without ground truth.
    assignment: metrics.json's "assignment" (prediction label -> class, -1 unmatched); None without truth.
  """
  ids = [ctx.ids[int(index)] for index in order]
  if per_image_iou is not None:
    chosen = np.argsort(per_image_iou, kind="stable")[:ctx.config.gallery_size]
  else:
    chosen = sorted(range(len(order)), key=lambda position: ids[position])[:ctx.config.gallery_size]
  names = jaxseg.data.class_names(ctx.config.data.name) if assignment is not None else None
  colours = colour_map(assignment, ctx.method.num_classes + 1, len(names) if names else 0)
  shutil.rmtree(ctx.workdir / "gallery", ignore_errors=True)  # no thumbnails of an earlier state
  rows, shown = [], []
  palette = viz.gallery_palette()
  for rank, position in enumerate(chosen):
    item = ctx.source[int(order[position])]
    pred = common.read_png_indices(ctx.image_path("predictions", item["id"]))
    shown.append(np.unique(pred))
    panels = {"image": item["image"], "prediction": viz.colorize(colours[pred], palette)}
    if "mask" in item:
      panels["truth"] = viz.colorize(item["mask"], palette)
    files = []
    for name in ("image", "prediction", "truth"):
      if name in panels:
        files.append(f"gallery/{rank:04d}_{name}.png")
        common.save_png(ctx.workdir / files[-1], _thumbnail(panels[name]))
    notes = [f"foreground {100 * np.mean(pred != 0):.1f}%"]
    score = None if per_image_iou is None else float(per_image_iou[position])
    if score is not None:
      notes.append(f"IoU {100 * score:.1f}%")
    rows.append(viz.GalleryRow(item["id"], score, files, notes))
  columns = ("image", "prediction", "ground truth") if per_image_iou is not None else ("image", "prediction")
  order_text = "worst foreground IoU first" if per_image_iou is not None else "by image id (no ground truth, no scores)"
  html = viz.gallery_html(
      rows, columns, title=f"jaxseg: {_dataset(ctx.config.data)}, {order_text}",
      worst_first=False,  # rows are already in their order
      legend=legend(np.unique(np.concatenate(shown or [np.zeros(0, np.int64)])), colours, names),
      banner=RANDOM_WEIGHTS_BANNER if ctx.config.model.weights == "random" else None, palette=palette)
  common.atomic_write_bytes(ctx.workdir / "gallery.html", html.encode())


def _dataset(data) -> str:
  """The dataset's name, with the split where it has splits (folders and "skimage" ignore data.split)."""
  if data.name.startswith("folder:") or data.name == "skimage":
    return data.name
  return f"{data.name} {data.split}"


def _thumbnail(image: np.ndarray, side: int = viz.PANEL_SIDE) -> np.ndarray:
  """Shrinks image [H, W, 3] so its longer side is at most `side` pixels (nearest, keeps label colours)."""
  step = max(1, -(-max(image.shape[:2]) // side))
  return image[::step, ::step]

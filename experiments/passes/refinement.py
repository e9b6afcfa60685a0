"""Stage 5, the refinement pass: each image's fused probability refined with the dense CRF at its own size.

    masks/<id>.png        the refined binary mask, stamped with the fingerprint and its per-level pixel counts
    fg_stats/NNNNNN.npz   per chunk: fg pixels and (intersection, union) per level against the ground truth

All refinement goes through jaxseg.framework.refine_stream: images packed into canvases of a few fixed
pixel counts, so a split compiles a few programs whatever its number of sizes; results come back out of
order. A mask already on disk under the current fingerprint is reused with the counts stamped in it, so a
resumed run refines only what is missing.
"""

import dataclasses

import numpy as np
import tqdm
from absl import logging

from experiments.passes import context
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg.framework.refine import canvas_size
from jaxseg.framework.refine import fitted_canvas

NAME = "refinement"
FG_LEVELS = framework.FG_LEVELS


# How images are packed for refinement changes no result (each image of a canvas is its own CRF).
_NOT_RESULTS = ("canvas_pixels",)


def fields(ctx: RunContext) -> dict:
  return {f"crf.{name}": value for name, value in dataclasses.asdict(ctx.method.crf).items()
          if name not in _NOT_RESULTS}


# ---- the pass ----------------------------------------------------------------------------------------------

def run(ctx: RunContext) -> None:
  todo = ctx.todo(NAME, "fg_stats")
  if not todo:
    return
  done: dict[int, dict] = {}  # source index -> {"fg_pixels", "counts", "has_gt"}
  items = []
  for c in todo:
    margins = ctx.load(ctx.path("margins", c), "fg_prob", "scores", "index")
    for slot, index in enumerate(margins["index"]):
      if index < 0:
        continue
      path = ctx.image_path("masks", ctx.ids[int(index)])
      if ctx.is_current(NAME, path):
        done[int(index)] = context.png_stats(path)
      else:
        items.append((int(index), margins["fg_prob"][slot], margins["scores"][:, slot]))
  has_truth = {}

  def refine_items():  # images are decoded as the stream asks for them
    for index, fg_prob, scores in items:
      item = ctx.source[index]
      has_truth[index] = "mask" in item
      yield framework.RefineItem(index, item["image"], fg_prob, scores, item.get("mask"))

  chunk_of = {int(i): c for c in todo for i in ctx.chunk(c)}
  pending = set(todo)
  for c in todo:
    _save_chunk_if_done(ctx, c, pending, done)
  sizes = {image["index"]: image["size"] for image in ctx.images}
  areas = [int(np.prod(sizes[i])) for i, _, _ in items]
  crf = fitted_canvas(ctx.method.crf, sum(areas))
  canvases = sorted({canvas_size(area, crf.canvas_pixels) or 0 for area in areas})
  logging.info("refinement: %d images packed into canvases of %s pixels; each canvas size's CRF programs "
               "compile on first use (seconds each on CPU), then every canvas of that size reuses them",
               len(items), [c for c in canvases if c])
  before = framework.refine_programs()
  # One canvas per device at a time: a canvas holds many images already, and its lattices ~400 bytes a pixel.
  stream = framework.refine_stream(refine_items(), crf, mesh=ctx.mesh)
  bar = tqdm.tqdm(stream, total=len(items), desc="refinement (CRF)", unit="image")
  for index, refined in bar:
    bar.set_postfix(compiled=framework.refine_programs() - before, refresh=False)
    stats = {"fg_pixels": refined.fg_pixels.tolist(), "counts": refined.counts.tolist(), "has_gt": has_truth[index]}
    ctx.save_png(NAME, ctx.image_path("masks", ctx.ids[index]), refined.mask.astype(np.uint8), stats=stats)
    done[index] = stats
    _save_chunk_if_done(ctx, chunk_of[index], pending, done)
  logging.info("refinement: %d refinement programs compiled for %d images (%d in this process)",
               framework.refine_programs() - before, len(items), framework.refine_programs())


def _save_chunk_if_done(ctx: RunContext, c: int, pending: set[int], done: dict[int, dict]) -> None:
  """Writes fg_stats of chunk c once every image of it is refined."""
  chunk = [int(i) for i in ctx.chunk(c)]
  if c not in pending or any(i not in done for i in chunk):
    return
  sizes = {image["index"]: image["size"] for image in ctx.images}
  ctx.save_npz(NAME, ctx.path("fg_stats", c), c,
               counts=np.asarray([done[i]["counts"] for i in chunk], np.int64),
               fg_pixels=np.asarray([done[i]["fg_pixels"] for i in chunk], np.int64),
               has_gt=np.asarray([done[i]["has_gt"] for i in chunk], bool),
               pixels=np.asarray([np.prod(sizes[i]) for i in chunk], np.int64), index=np.asarray(chunk, np.int64))
  pending.discard(c)

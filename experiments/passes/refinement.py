"""Stage 5, the refinement pass: each image's fused probability refined with the dense CRF at its own size.

    masks/<id>.png        the refined binary mask, stamped with the fingerprint and its per-level pixel counts
    fg_stats/NNNNNN.npz   per chunk: fg pixels and (intersection, union) per level against the ground truth

All refinement goes through one jaxseg.framework.Refiner owned by the run: images packed into canvases of a
few fixed pixel counts, so a split compiles a few programs whatever its number of sizes (the Refiner counts
them); masks come back out of order. The per-level statistics are framework.level_stats of each mask. A mask
already on disk under the current fingerprint is reused with the counts stamped in it, so a resumed run
refines only what is missing.
"""

import dataclasses

import numpy as np
import tqdm
from absl import logging

from experiments.passes import context
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg.framework.refine_pack import canvas_size
from jaxseg.framework.refine_pack import fitted_canvas_pixels

NAME = "refinement"
FG_LEVELS = framework.FG_LEVELS


def fields(ctx: RunContext) -> dict:
  """The CRF's parameters, and max_side: of the execution options, only it changes masks (of larger images)."""
  crf = ctx.method.crf
  return {**{f"crf.{name}": value for name, value in dataclasses.asdict(crf.params).items()},
          "crf.max_side": crf.max_side}


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
  grids = {index: (fg_prob, scores) for index, fg_prob, scores in items}
  truths = {}

  def refine_items():  # images are decoded as the stream asks for them
    for index, fg_prob, _ in items:
      item = ctx.source[index]
      truths[index] = item.get("mask")
      yield index, item["image"], fg_prob

  chunk_of = {int(i): c for c in todo for i in ctx.chunk(c)}
  pending = set(todo)
  for c in todo:
    _save_chunk_if_done(ctx, c, pending, done)
  crf = ctx.method.crf
  sizes = {image["index"]: image["size"] for image in ctx.images}
  works = [framework.downscaled_size(tuple(sizes[i]), crf.max_side) for i, _, _ in items]
  options = dataclasses.replace(crf.options, canvas_pixels=fitted_canvas_pixels(
      sum(h * w for h, w in works), crf.canvas_pixels))
  canvases = sorted({canvas_size(h, w, options.canvas_pixels, crf.gaussian_sxy) or 0 for h, w in works})
  logging.info("refinement: %d images packed into canvases of %s pixels; each canvas size's CRF programs "
               "compile on first use (seconds each on CPU), then every canvas of that size reuses them",
               len(items), [c for c in canvases if c])
  # One canvas per device at a time: a canvas holds many images already, and its lattices ~400 bytes a pixel.
  refiner = framework.Refiner(crf.params, options, mesh=ctx.mesh)
  bar = tqdm.tqdm(refiner.stream(refine_items()), total=len(items), desc="refinement (CRF)", unit="image")
  for index, mask in bar:
    bar.set_postfix(compiled=refiner.num_programs, refresh=False)
    fg_prob, scores = grids.pop(index)
    truth = truths.pop(index)
    fg_pixels, counts = framework.level_stats(scores, fg_prob, mask, truth)
    stats = {"fg_pixels": fg_pixels.tolist(), "counts": counts.tolist(), "has_gt": truth is not None}
    ctx.save_png(NAME, ctx.image_path("masks", ctx.ids[index]), mask.astype(np.uint8), stats=stats)
    done[index] = stats
    _save_chunk_if_done(ctx, chunk_of[index], pending, done)
  logging.info("refinement: %d refinement programs for %d images (capacities per canvas size: %s)",
               refiner.num_programs, len(items), refiner.capacities)


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

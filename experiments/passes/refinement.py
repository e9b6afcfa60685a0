"""Stage 5, the refinement pass: each image's fused probability refined with the dense CRF at its own size.

    masks/<id>.png        the refined binary mask, stamped with the fingerprint and its per-level pixel counts
    fg_stats/NNNNNN.npz   per chunk: fg pixels and (intersection, union) per level against the ground truth

All refinement goes through `_refine_stream` (jaxseg.framework.refine.refine_stream, batched by size
bucket; results come back out of order). A mask already on disk under the current fingerprint is reused
with the counts stamped in it, so a resumed run refines only what is missing.
"""

import dataclasses
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from experiments.passes import context
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg import metrics
from jaxseg.framework import refine as refine_module

NAME = "refinement"
FG_LEVELS = ("dataset", "category", "image", "fused", "refined")


def fields(ctx: RunContext) -> dict:
  return {f"crf.{name}": value for name, value in dataclasses.asdict(ctx.method.crf).items()}


# ---- the one adapter to refine_stream (a stand-in until jaxseg.framework.refine has it) ---------------------

class RefineItem(NamedTuple):
  key: int
  image: np.ndarray  # [H, W, 3] uint8
  fg_prob: np.ndarray  # [h, w]
  level_scores: np.ndarray  # [3, h, w]
  truth: np.ndarray | None  # [H, W] uint8


class RefinedImage(NamedTuple):
  mask: np.ndarray  # [H, W] bool
  fg_pixels: np.ndarray  # [5] int64
  counts: np.ndarray  # [5, 2] int64 (intersection, union)


def _refine_one_at_a_time(items: Iterable[RefineItem], crf, *, batch_size=1, mesh=None):
  """refine_stream's contract, one image at a time (the stand-in; deleted once refine_stream exists)."""
  del batch_size, mesh
  for item in items:
    refined = np.asarray(framework.refine(jnp.asarray(item.image), jnp.asarray(item.fg_prob), crf))
    size = item.image.shape[:2]
    level_masks = [np.asarray(framework.upsample(item.level_scores[level], size)) > 0.5 for level in range(3)]
    level_masks += [np.asarray(framework.upsample(item.fg_prob, size)) > 0.5, refined]
    fg_pixels = np.asarray([np.sum(m) for m in level_masks], np.int64)
    counts = np.zeros((len(FG_LEVELS), 2), np.int64)
    if item.truth is not None:
      counts = np.stack([np.asarray(metrics.foreground_counts(jnp.asarray(m), jnp.asarray(item.truth)), np.int64)
                         for m in level_masks])
    yield item.key, RefinedImage(refined, fg_pixels, counts)


def _refine_stream(items: Iterable[RefineItem], crf, *, batch_size: int, mesh) -> Iterator[tuple[int, RefinedImage]]:
  stream = getattr(refine_module, "refine_stream", None)
  if stream is None:
    return _refine_one_at_a_time(items, crf, batch_size=batch_size, mesh=mesh)
  return ((key, RefinedImage(np.asarray(r.mask), np.asarray(r.fg_pixels, np.int64), np.asarray(r.counts, np.int64)))
          for key, r in stream((refine_module.RefineItem(*item) for item in items), crf, batch_size=batch_size,
                               mesh=mesh))


def refine_programs() -> int | None:
  counter = getattr(refine_module, "refine_programs", None)
  return None if counter is None else counter()


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
      yield RefineItem(index, item["image"], fg_prob, scores, item.get("mask"))

  chunk_of = {int(i): c for c in todo for i in ctx.chunk(c)}
  pending = set(todo)
  for c in todo:
    _save_chunk_if_done(ctx, c, pending, done)
  stream = _refine_stream(refine_items(), ctx.method.crf, batch_size=ctx.config.batch_size, mesh=ctx.mesh)
  for index, refined in tqdm.tqdm(stream, total=len(items), desc="refinement (CRF)", unit="image"):
    stats = {"fg_pixels": refined.fg_pixels.tolist(), "counts": refined.counts.tolist(), "has_gt": has_truth[index]}
    ctx.save_png(NAME, ctx.image_path("masks", ctx.ids[index]), refined.mask.astype(np.uint8), stats=stats)
    done[index] = stats
    _save_chunk_if_done(ctx, chunk_of[index], pending, done)
  programs = refine_programs()
  if programs is not None:
    logging.info("refinement: %d compiled refinement programs so far", programs)


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

"""Stages 3 and 4, the image-level pass: per chunk, the 2-means of each image and the fusion of the levels.

    margins/NNNNNN.npz   per-level margins (float16), level scores, fused fg probability, categories
"""

import numpy as np
import tqdm

from experiments.passes import levels
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg import parallel

NAME = "image_level"


def fields(ctx: RunContext) -> dict:
  return levels.method_fields(ctx, "fusion", "score_temperature", "kmeans_max_iter", "kmeans_tol")


def run(ctx: RunContext) -> None:
  todo = ctx.todo(NAME, "margins")
  if not todo:
    return
  dataset = levels.dataset_level(ctx)
  category_centroids, category_prototypes = levels.category_level(ctx)
  for c in tqdm.tqdm(todo, desc="image level + fusion", unit="chunk"):
    features, arrays = ctx.features(c, "patches", "cls")
    result, scores, fg_prob = framework.image_level_and_fusion(features, dataset, category_centroids,
                                                               category_prototypes, ctx.method)
    margins, scores, fg_prob, categories = parallel.to_host((result.margins, scores, fg_prob, result.categories))
    b = len(arrays["valid"])  # the chunk's own images, without the padding for the devices
    ctx.save_npz(NAME, ctx.path("margins", c), margins=margins[:, :b].astype(np.float16), scores=scores[:, :b],
                 fg_prob=fg_prob[:b], categories=categories[:b], index=arrays["index"])

"""Stages 1 and 2, the dataset-level and category-level passes: dataset-wide fits, on process 0.

    levels/dataset.npz    centroids, foreground flags, prototypes, summed cluster stats
    levels/category.npz   category centroids and (bg, fg) prototypes

Both stream the feature cache through framework.compose (the functions segment_features composes), reading
only the members they use: the category level reads the CLS tokens alone to fit its centroids.
"""

import jax.numpy as jnp
import numpy as np

from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg import parallel

DATASET = "dataset_level"
CATEGORY = "category_level"
_KMEANS = ("sample_budget", "kmeans_n_init", "kmeans_max_iter", "kmeans_tol")


def method_fields(ctx: RunContext, *names: str) -> dict:
  return {f"method.{name}": getattr(ctx.method, name) for name in names}


def dataset_fields(ctx: RunContext) -> dict:
  return {"seed": ctx.seed, **method_fields(ctx, "dataset_k", "fg_prior", *_KMEANS)}


def category_fields(ctx: RunContext) -> dict:
  return {"seed": ctx.seed, **method_fields(ctx, "num_categories", *_KMEANS)}


def _dataset_path(ctx: RunContext):
  return ctx.workdir / "levels" / "dataset.npz"


def _category_path(ctx: RunContext):
  return ctx.workdir / "levels" / "category.npz"


def run_dataset(ctx: RunContext) -> None:
  path = _dataset_path(ctx)
  if ctx.is_current(DATASET, path):
    return
  level, stats = framework.fit_dataset_level(
      ctx.feature_batches("patches", "attention"), ctx.method, key=ctx.key_of(DATASET),
      num_patches=ctx.num_patches(),
      # Whole on every device: GSPMD's k-means++ cumsum over split points is quadratic in them.
      place=lambda sample: parallel.replicate(sample, ctx.mesh))
  ctx.save_npz(DATASET, path, **{k: np.asarray(v) for k, v in level._asdict().items()},
               **{f"stats_{k}": v for k, v in stats._asdict().items()})


def dataset_level(ctx: RunContext) -> framework.DatasetLevel:
  arrays = ctx.load(_dataset_path(ctx), *framework.DatasetLevel._fields)
  return framework.DatasetLevel(*(jnp.asarray(arrays[f]) for f in framework.DatasetLevel._fields))


def run_category(ctx: RunContext) -> None:
  path = _category_path(ctx)
  if ctx.is_current(CATEGORY, path):
    return
  parts = [ctx.load(ctx.path("features", c), "cls", "valid") for c in range(ctx.num_chunks)]
  cls = np.concatenate([p["cls"][p["valid"].any(axis=(1, 2))] for p in parts])
  centroids, prototypes = framework.fit_category_level(
      jnp.asarray(cls), ctx.feature_batches("patches", "cls"), dataset_level(ctx), ctx.method,
      key=ctx.key_of(CATEGORY), num_patches=ctx.num_patches())
  ctx.save_npz(CATEGORY, path, centroids=np.asarray(centroids), prototypes=np.asarray(prototypes))


def category_level(ctx: RunContext) -> tuple[jnp.ndarray, jnp.ndarray]:
  """([C, D] category centroids, [C, 2, D] prototypes)."""
  arrays = ctx.load(_category_path(ctx), "centroids", "prototypes")
  return jnp.asarray(arrays["centroids"]), jnp.asarray(arrays["prototypes"])

"""Stage 6, the labeling passes: region descriptors per chunk, the class k-means, the label maps.

    descriptors/NNNNNN.npz   one descriptor per region (index, region number), per chunk
    levels/classes.npz       centroids and the class of every region, the number of classes used
    predictions/<id>.png     label map (VOC palette, 0 = background), stamped

num_classes is reduced to the split's region count when it has fewer regions (recorded in
classes.npz and metrics.json "effective"), so a tiny split is labelled rather than failing late.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

import jaxseg.data
from experiments import common
from experiments.passes import levels
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg import models
from jaxseg import parallel
from jaxseg import viz

DESCRIPTORS = "descriptors"
CLASSES = "classes"
PREDICTIONS = "predictions"


def descriptor_fields(ctx: RunContext) -> dict:
  return levels.method_fields(ctx, "descriptor", "min_region_area", "min_region_fraction")


def class_fields(ctx: RunContext) -> dict:
  return {"seed": ctx.seed, **levels.method_fields(ctx, "num_classes", "sample_budget", "kmeans_n_init",
                                                          "kmeans_max_iter", "kmeans_tol")}


def prediction_fields(ctx: RunContext) -> dict:
  return levels.method_fields(ctx, "min_region_area", "min_region_fraction")


# ---- descriptors --------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("vit", "dtype"))
def _cls_tokens(params, images, patch_mask, *, vit, dtype):
  return models.encode(params, images, vit, dtype=dtype, patch_mask=patch_mask).cls


def _encode_cls(ctx: RunContext, images: np.ndarray, patch_masks: np.ndarray | None) -> np.ndarray:
  """[R, D] CLS tokens of R normalised images [R, S, S, 3], in fixed-size batches (one compilation)."""
  b = parallel.padded_size(ctx.config.batch_size, ctx.mesh.size)  # batches split evenly over the devices
  out = []
  for start in range(0, len(images), b):
    chunk = images[start:start + b]
    pad = b - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    mask = None
    if patch_masks is not None:
      mask = patch_masks[start:start + b]
      mask = np.concatenate([mask, np.ones((pad, *mask.shape[1:]), bool)])
    cls = _cls_tokens(ctx.params(), *ctx.on_devices((chunk, mask)), vit=ctx.vit,
                      dtype=jnp.dtype(ctx.config.model.dtype))
    out.append(parallel.to_host(cls)[:b - pad])
  return np.concatenate(out) if out else np.zeros((0, ctx.vit.dim), np.float32)


def _regions(ctx: RunContext, image_id: str) -> tuple[np.ndarray, int]:
  mask = common.read_png_indices(ctx.image_path("masks", image_id)).astype(bool)
  return framework.regions(mask, ctx.method.min_region_area, ctx.method.min_region_fraction)


def run_descriptors(ctx: RunContext) -> None:
  """One descriptor per foreground region of every image (docs/design.md stage 6)."""
  size = ctx.config.image_size
  descriptor = ctx.method.descriptor
  if descriptor != "pooled":
    ctx.params()  # on every process, whatever its share of the work
  for c in tqdm.tqdm(ctx.todo(DESCRIPTORS, DESCRIPTORS), desc=f"descriptors ({descriptor})", unit="chunk"):
    chunk = ctx.load(ctx.path("features", c), "index", *(["tokens"] if descriptor == "pooled" else []))
    index, region, inputs, patch_masks, pooled = [], [], [], [], []
    for slot, source_index in enumerate(chunk["index"]):
      if source_index < 0:
        continue
      region_map, count = _regions(ctx, ctx.ids[int(source_index)])
      if count == 0:
        continue
      index += [source_index] * count
      region += list(range(1, count + 1))
      fractions = framework.region_patch_fractions(region_map, count, ctx.grid())
      if descriptor == "pooled":
        pooled.append(np.asarray(framework.pooled_descriptors(chunk["tokens"][slot], fractions)))
        continue
      image = ctx.source[int(source_index)]["image"]
      if descriptor == "masked":
        inputs += [jaxseg.data.normalize_images(jaxseg.data.resize_image(image, size), mean=ctx.vit.mean,
                                                std=ctx.vit.std)] * count
        patch_masks.append(framework.region_patch_masks(fractions))
      else:
        inputs += [jaxseg.data.normalize_images(jaxseg.data.resize_image(framework.crop(image, box), size),
                                               mean=ctx.vit.mean, std=ctx.vit.std)
                   for box in framework.region_boxes(region_map, count)]
    if descriptor == "pooled":
      descriptors = np.concatenate(pooled) if pooled else np.zeros((0, ctx.vit.dim), np.float32)
    else:
      images = np.stack(inputs) if inputs else np.zeros((0, size, size, 3), np.float32)
      descriptors = _encode_cls(ctx, images, np.concatenate(patch_masks) if patch_masks else None)
    ctx.save_npz(DESCRIPTORS, ctx.path(DESCRIPTORS, c), descriptors=descriptors.astype(np.float32),
                 index=np.asarray(index, np.int64), region=np.asarray(region, np.int32))


# ---- classes -------------------------------------------------------------------------------------------------

def _classes_path(ctx: RunContext):
  return ctx.workdir / "levels" / "classes.npz"


def run_classes(ctx: RunContext) -> None:
  """The class of every region: k-means of all descriptors, num_classes reduced to the region count."""
  path = _classes_path(ctx)
  if not ctx.is_current(CLASSES, path):
    parts = [ctx.load(ctx.path(DESCRIPTORS, c), "descriptors", "index", "region") for c in range(ctx.num_chunks)]
    descriptors = np.concatenate([p["descriptors"] for p in parts])
    num_classes = min(ctx.method.num_classes, len(descriptors))
    if num_classes < ctx.method.num_classes:
      logging.warning("method.num_classes=%d but the split has %d regions: labelling with %d classes",
                      ctx.method.num_classes, len(descriptors), num_classes)
    if num_classes:
      method = dataclasses.replace(ctx.method, num_classes=num_classes)
      centroids = framework.fit_classes(jnp.asarray(descriptors), method, key=ctx.key_of(CLASSES))
      classes = framework.assign_classes(jnp.asarray(descriptors), centroids)
    else:  # no foreground anywhere: every pixel is background
      centroids, classes = np.zeros((0, descriptors.shape[-1]), np.float32), np.zeros(0, np.int32)
    ctx.save_npz(CLASSES, path, centroids=np.asarray(centroids), classes=np.asarray(classes),
                 index=np.concatenate([p["index"] for p in parts]),
                 region=np.concatenate([p["region"] for p in parts]), num_classes=np.asarray(num_classes))


def num_classes_used(ctx: RunContext) -> int:
  """The number of classes the regions were clustered into (num_classes, or fewer regions)."""
  return int(ctx.load(_classes_path(ctx), "num_classes")["num_classes"])


def classes_by_image(ctx: RunContext) -> dict[int, np.ndarray]:
  """{source index: [R] class of each region, in region order}."""
  arrays = ctx.load(_classes_path(ctx), "classes", "index", "region")
  by_image = {}
  for index, region, cls in zip(arrays["index"], arrays["region"], arrays["classes"]):
    by_image.setdefault(int(index), {})[int(region)] = int(cls)
  return {index: np.asarray([regions[r] for r in sorted(regions)]) for index, regions in by_image.items()}


# ---- predictions ---------------------------------------------------------------------------------------------

def run_predictions(ctx: RunContext) -> None:
  palette = viz.voc_palette()
  classes = classes_by_image(ctx)
  for index in tqdm.tqdm(ctx.owned_indices(), desc=PREDICTIONS, unit="image"):
    image_id = ctx.ids[int(index)]
    path = ctx.image_path(PREDICTIONS, image_id)
    if ctx.is_current(PREDICTIONS, path):
      continue
    region_map, count = _regions(ctx, image_id)
    region_classes = classes.get(int(index), np.zeros(0, np.int64))
    if len(region_classes) != count:  # the fingerprints make this impossible; never write a mixed result
      raise RuntimeError(f"{path}: {count} regions but {len(region_classes)} classes")
    ctx.save_png(PREDICTIONS, path, framework.label_map(region_map, region_classes), palette=palette)

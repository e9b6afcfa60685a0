"""The segment runner's work: the method of DESIGN.md over a whole split, resumable.

Each pass reads what the previous one left in the workdir and writes its own
results atomically, one chunk (a batch of `batch_size` images) or one image at
a time; a pass skips what is already on disk, so a killed run restarted with
the same workdir continues where it stopped. Layout of the workdir:

    config.json                 the resolved config (a rerun must match it)
    features/NNNNNN.npz         per chunk: unit patch features (float16), CLS, attention, valid, index
    levels/dataset.npz          stage 1: centroids, foreground flags, prototypes
    levels/category.npz         stage 2: category centroids and (bg, fg) prototypes
    margins/NNNNNN.npz          per chunk: per-level margins and the fused fg probability
    masks/<id>.png              stage 5: refined binary mask at the image's resolution
    fg_stats/NNNNNN.npz         per chunk: fg intersection/union per level against the ground truth
    descriptors/NNNNNN.npz      stage 6: one descriptor per region
    levels/classes.npz          stage 6: the class of every region
    predictions/<id>.png        label map (VOC palette, 0 = background)
    metrics.json, gallery.html, gallery/  the report
    timings.json                seconds per stage, summed over resumed runs

Devices and hosts: the per-chunk passes run data-parallel over the process's
local devices (jaxseg.parallel); a chunk is padded with invalid images to a
multiple of the device count for the computation only, so the cache is the
same for any number of devices. With several processes (experiments/distributed.py)
the workdir must be shared: process p computes the chunks c with c % count == p,
and process 0 fits the dataset-wide levels and classes and writes the report
while the others wait at a barrier and then read them.
"""

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

import jaxseg.data
from experiments import common
from experiments import distributed
from jaxseg import metrics
from jaxseg import models
from jaxseg import parallel
from jaxseg import viz
from jaxseg import framework
from jaxseg.cluster.stream import ReservoirState
from jaxseg.cluster.stream import reservoir_init
from jaxseg.framework import MethodConfig
from jaxseg.framework import PatchFeatures

# Fields that do not change any result: a resumed run may differ in these.
_PRESENTATION_FIELDS = ("gallery_size", "distributed")


@dataclasses.dataclass
class Run:
  """Everything the passes share: the config, the data, the model, the workdir."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  method: MethodConfig
  source: object
  indices: np.ndarray  # [N] source indices of the run, in order
  params: object
  vit: models.ViTConfig
  key: jax.Array
  timings: dict
  mesh: jax.sharding.Mesh  # this process's devices; per-chunk work runs data-parallel over them
  process: tuple[int, int] = (0, 1)  # (index, count); process p owns the chunks c with c % count == p

  @property
  def num_chunks(self) -> int:
    return -(-len(self.indices) // self.config.batch_size)

  @property
  def is_main(self) -> bool:
    """Process 0 fits the dataset-wide levels and classes and writes the report."""
    return self.process[0] == 0

  def chunk(self, c: int) -> np.ndarray:
    b = self.config.batch_size
    return self.indices[c * b:(c + 1) * b]

  def path(self, folder: str, c: int) -> pathlib.Path:
    return self.workdir / folder / f"{c:06d}.npz"

  def owned(self) -> list[int]:
    """The chunks this process computes the per-chunk passes of."""
    index, count = self.process
    return list(range(index, self.num_chunks, count))

  def todo(self, folder: str) -> list[int]:
    return [c for c in self.owned() if not self.path(folder, c).exists()]

  def on_devices(self, batch):
    """A host batch (pytree of [B, ...] arrays) padded to a multiple of the devices and sharded over them."""
    return parallel.shard_batch(parallel.pad_batch(batch, self.mesh.size), self.mesh)

  def capped_method(self, per: int = 1) -> MethodConfig:
    """The method with its sample budget capped so that each of `per` samples holds at most every patch.

    A reservoir at least as large as the stream keeps all of it, so a larger one would only cost memory
    (the default 1M x 384 budget is 1.5 GB whatever the split's size).
    """
    h, w = self.grid()
    return dataclasses.replace(self.method, sample_budget=min(self.method.sample_budget,
                                                              per * len(self.indices) * h * w))

  @functools.cached_property
  def ids(self) -> dict[int, str]:
    """{source index: image id} of the run, from the feature cache (read once the features pass is done)."""
    ids = {}
    for c in range(self.num_chunks):
      with np.load(self.path("features", c)) as f:
        ids.update((int(i), str(name)) for i, name in zip(f["index"], f["id"]) if i >= 0)
    return ids

  def grid(self) -> tuple[int, int]:
    side = self.config.image_size // self.vit.patch_size
    return side, side


def method_config(config: ml_collections.ConfigDict) -> MethodConfig:
  return MethodConfig.from_mappings(config.method.to_dict(), config.crf.to_dict())


def _check_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, or checks that a resumed run uses the same config."""
  resolved = {k: v for k, v in json.loads(config.to_json()).items() if k not in _PRESENTATION_FIELDS}
  path = workdir / "config.json"
  if path.exists():
    previous = {k: v for k, v in json.loads(path.read_text()).items() if k not in _PRESENTATION_FIELDS}
    if previous != resolved:
      changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
      raise ValueError(f"{path} holds a run with a different config (fields {changed} differ); "
                       "use a new --workdir, or the config of that run to resume it")
  else:
    common.save_json(path, json.loads(config.to_json()))


def _load_chunk(run: Run, c: int) -> tuple[PatchFeatures, dict]:
  """(the chunk's features padded and sharded over run.mesh, its arrays as stored)."""
  arrays = common.load_npz(run.path("features", c))
  features = run.on_devices(PatchFeatures(patches=arrays["patches"].astype(np.float32), cls=arrays["cls"],
                                          attention=arrays["attention"], valid=arrays["valid"]))
  return features, arrays


def _chunks(run: Run, desc: str, chunk_ids=None) -> Iterator[tuple[int, PatchFeatures, dict]]:
  chunk_ids = range(run.num_chunks) if chunk_ids is None else chunk_ids
  for c in tqdm.tqdm(chunk_ids, desc=desc, unit="chunk"):
    yield (c, *_load_chunk(run, c))


def _stage(run: Run, name: str):
  """Context manager adding the wall time of a stage to run.timings and timings.json."""
  class Timer:
    def __enter__(self):
      self.start = time.perf_counter()

    def __exit__(self, *exc):
      run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - self.start
      if run.is_main:
        common.save_json(run.workdir / "timings.json", run.timings)
  return Timer()


# ---- stage 0: features -----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("vit", "feature", "dtype", "keep_tokens"))
def _encode_batch(params, images, valid, *, vit, feature, dtype, keep_tokens):
  out = models.encode(params, images, vit, dtype=dtype)
  features = framework.patch_features(out, feature, valid)
  tokens = out.patch_tokens.astype(jnp.float16) if keep_tokens else None
  return features, tokens


def extract_features(run: Run) -> None:
  todo = run.todo("features")
  if not todo:
    return
  dtype = jnp.dtype(run.config.model.dtype)
  keep_tokens = run.method.descriptor == "pooled"
  batches = jaxseg.data.batches(run.source, batch_size=run.config.batch_size, image_size=run.config.image_size,
                                patch_size=run.vit.patch_size, indices=np.concatenate([run.chunk(c) for c in todo]))
  for c, batch in zip(todo, tqdm.tqdm(batches, total=len(todo), desc="features", unit="batch")):
    images, valid = run.on_devices((batch["image"], batch["valid"]))
    features, tokens = _encode_batch(run.params, images, valid, vit=run.vit, feature=run.method.feature,
                                     dtype=dtype, keep_tokens=keep_tokens)
    # Only the chunk's own rows are cached: the cache does not depend on the number of devices.
    features, tokens = jax.tree.map(lambda a: a[:len(batch["valid"])], parallel.to_host((features, tokens)))
    arrays = dict(patches=features.patches.astype(np.float16), cls=features.cls, attention=features.attention,
                  valid=features.valid, index=batch["index"], size=batch["size"], id=np.asarray(batch["id"]))
    if keep_tokens:
      arrays["tokens"] = tokens
    common.save_npz(run.path("features", c), **arrays)


# ---- stages 1 and 2: dataset and category levels ---------------------------------------------------

def _whole(run: Run, sample: ReservoirState) -> ReservoirState:
  """The reservoir whole on every device of run.mesh.

  Not split over the devices: k-means++ takes a cumsum over the points, which GSPMD
  computes in time quadratic in the points when they are split (minutes for 1M).
  """
  return parallel.replicate(sample, run.mesh)


def _dataset_level(run: Run) -> framework.DatasetLevel:
  path = run.workdir / "levels" / "dataset.npz"
  if not path.exists():
    sample_key, fit_key = jax.random.split(jax.random.fold_in(run.key, 1))
    sample = None
    for c, features, _ in _chunks(run, "dataset level: sample"):
      if sample is None:
        sample = reservoir_init(run.capped_method().sample_budget, features.patches.shape[-1])
      sample = framework.sample_patches(sample, features, key=jax.random.fold_in(sample_key, c))
    centroids = framework.fit_dataset_centroids(_whole(run, sample), run.method, key=fit_key)
    stats = None
    for _, features, _ in _chunks(run, "dataset level: assign"):
      stats = framework.accumulate_stats(stats, framework.dataset_cluster_stats(features, centroids))
    level = framework.dataset_level(centroids, stats, run.method.fg_prior)
    common.save_npz(path, **level._asdict(), **{f"stats_{k}": v for k, v in stats._asdict().items()})
  arrays = common.load_npz(path)
  return framework.DatasetLevel(*(jnp.asarray(arrays[f]) for f in framework.DatasetLevel._fields))


def _category_level(run: Run, dataset: framework.DatasetLevel) -> tuple[jax.Array, jax.Array]:
  path = run.workdir / "levels" / "category.npz"
  if not path.exists():
    sample_key, fit_key = jax.random.split(jax.random.fold_in(run.key, 2))
    cls = np.concatenate([arrays["cls"][arrays["valid"].any(axis=(1, 2))]
                          for _, _, arrays in _chunks(run, "category level: CLS")])
    centroids = framework.fit_categories(jnp.asarray(cls), run.method, key=fit_key)
    samples = framework.category_sample_init(run.capped_method(per=run.method.num_categories),
                                             dataset.centroids.shape[-1])
    for c, features, _ in _chunks(run, "category level: sample"):
      categories = framework.assign_categories(features, centroids)
      samples = framework.sample_category_patches(samples, features, categories,
                                               key=jax.random.fold_in(sample_key, c))
    prototypes = framework.fit_category_prototypes(samples, dataset, run.method)
    common.save_npz(path, centroids=np.asarray(centroids), prototypes=np.asarray(prototypes))
  arrays = common.load_npz(path)
  return jnp.asarray(arrays["centroids"]), jnp.asarray(arrays["prototypes"])


# ---- stages 3 and 4: image level, fusion -----------------------------------------------------------

def image_level_and_fusion(run: Run, dataset, category_centroids, category_prototypes) -> None:
  for c, features, arrays in _chunks(run, "image level + fusion", run.todo("margins")):
    result = framework.level_margins(features, dataset, category_centroids, category_prototypes, run.method)
    scores, fg_prob = framework.scores_and_probability(result.margins, features.valid, run.method)
    margins, scores, fg_prob, categories = parallel.to_host((result.margins, scores, fg_prob, result.categories))
    b = len(arrays["valid"])  # the chunk's own images, without the padding for the devices
    common.save_npz(run.path("margins", c), margins=margins[:, :b].astype(np.float16), scores=scores[:, :b],
                    fg_prob=fg_prob[:b], categories=categories[:b])


# ---- stage 5: refinement, and foreground IoU per level ---------------------------------------------

FG_LEVELS = ("dataset", "category", "image", "fused", "refined")


def _mask_path(run: Run, folder: str, image_id: str) -> pathlib.Path:
  return run.workdir / folder / f"{image_id}.png"


def refine_masks(run: Run) -> None:
  """Refines every image's fused probability at its own resolution; per chunk, fg counts per level."""
  for c in tqdm.tqdm(run.todo("fg_stats"), desc="refinement (CRF)", unit="chunk"):
    features = common.load_npz(run.path("features", c))
    margins = common.load_npz(run.path("margins", c))
    counts = np.zeros((len(features["index"]), len(FG_LEVELS), 2), np.int64)  # (intersection, union)
    fg_pixels = np.zeros((len(features["index"]), len(FG_LEVELS)), np.int64)
    has_gt = np.zeros(len(features["index"]), bool)
    for slot, index in enumerate(features["index"]):
      if index < 0:
        continue
      item = run.source[int(index)]
      path = _mask_path(run, "masks", item["id"])
      if path.exists():
        refined = common.read_png_indices(path).astype(bool)
      else:
        refined = np.asarray(framework.refine(jnp.asarray(item["image"]), jnp.asarray(margins["fg_prob"][slot]),
                                           run.method.crf))
        common.save_png(path, refined.astype(np.uint8))
      size = item["image"].shape[:2]
      level_masks = [framework.upsample(margins["scores"][level, slot], size) > 0.5 for level in range(3)]
      level_masks += [framework.upsample(margins["fg_prob"][slot], size) > 0.5, refined]
      fg_pixels[slot] = [int(np.sum(m)) for m in level_masks]
      if "mask" in item:
        has_gt[slot] = True
        counts[slot] = [np.asarray(metrics.foreground_counts(jnp.asarray(m), jnp.asarray(item["mask"])))
                        for m in level_masks]
    common.save_npz(run.path("fg_stats", c), counts=counts, fg_pixels=fg_pixels, has_gt=has_gt,
                    pixels=features["size"].prod(axis=1).astype(np.int64), index=features["index"])


# ---- stage 6: labeling ------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("vit", "dtype"))
def _cls_tokens(params, images, patch_mask, *, vit, dtype):
  return models.encode(params, images, vit, dtype=dtype, patch_mask=patch_mask).cls


def _encode_cls(run: Run, images: np.ndarray, patch_masks: np.ndarray | None) -> np.ndarray:
  """[R, D] CLS tokens of R normalised images [R, S, S, 3], in fixed-size batches (one compilation)."""
  b = parallel.padded_size(run.config.batch_size, run.mesh.size)  # batches split evenly over the devices
  out = []
  for start in range(0, len(images), b):
    chunk = images[start:start + b]
    pad = b - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    mask = None
    if patch_masks is not None:
      mask = patch_masks[start:start + b]
      mask = np.concatenate([mask, np.ones((pad, *mask.shape[1:]), bool)])
    cls = _cls_tokens(run.params, *run.on_devices((chunk, mask)), vit=run.vit, dtype=jnp.dtype(run.config.model.dtype))
    out.append(parallel.to_host(cls)[:b - pad])
  return np.concatenate(out) if out else np.zeros((0, run.vit.dim), np.float32)


def _regions(run: Run, image_id: str) -> tuple[np.ndarray, int]:
  mask = common.read_png_indices(_mask_path(run, "masks", image_id)).astype(bool)
  return framework.regions(mask, run.method.min_region_area)


def describe_regions(run: Run) -> None:
  """One descriptor per foreground region of every image (DESIGN.md stage 6)."""
  size = run.config.image_size
  for c in tqdm.tqdm(run.todo("descriptors"), desc=f"descriptors ({run.method.descriptor})", unit="chunk"):
    features = common.load_npz(run.path("features", c))
    index, region, inputs, patch_masks, pooled = [], [], [], [], []
    for slot, source_index in enumerate(features["index"]):
      if source_index < 0:
        continue
      item = run.source[int(source_index)]
      region_map, count = _regions(run, item["id"])
      if count == 0:
        continue
      index += [source_index] * count
      region += list(range(1, count + 1))
      fractions = framework.region_patch_fractions(region_map, count, run.grid())
      if run.method.descriptor == "pooled":
        pooled.append(np.asarray(framework.pooled_descriptors(features["tokens"][slot], fractions)))
      elif run.method.descriptor == "masked":
        resized = jaxseg.data.normalize_images(jaxseg.data.resize_image(item["image"], size))
        inputs += [resized] * count
        patch_masks.append(framework.region_patch_masks(fractions))
      else:
        boxes = framework.region_boxes(region_map, count)
        inputs += [jaxseg.data.normalize_images(jaxseg.data.resize_image(framework.crop(item["image"], box), size))
                   for box in boxes]
    if run.method.descriptor == "pooled":
      descriptors = np.concatenate(pooled) if pooled else np.zeros((0, run.vit.dim), np.float32)
    else:
      images = np.stack(inputs) if inputs else np.zeros((0, size, size, 3), np.float32)
      descriptors = _encode_cls(run, images, np.concatenate(patch_masks) if patch_masks else None)
    common.save_npz(run.path("descriptors", c), descriptors=descriptors.astype(np.float32),
                    index=np.asarray(index, np.int64), region=np.asarray(region, np.int32))


def classify_regions(run: Run) -> dict[int, np.ndarray]:
  """Class of every region: k-means of all descriptors. Returns {source index: [R] classes}."""
  path = run.workdir / "levels" / "classes.npz"
  if not path.exists():
    parts = [common.load_npz(run.path("descriptors", c)) for c in range(run.num_chunks)]
    descriptors = np.concatenate([p["descriptors"] for p in parts])
    centroids = framework.fit_classes(jnp.asarray(descriptors), run.method, key=jax.random.fold_in(run.key, 6))
    classes = framework.assign_classes(jnp.asarray(descriptors), centroids)
    common.save_npz(path, centroids=np.asarray(centroids), classes=classes,
                    index=np.concatenate([p["index"] for p in parts]),
                    region=np.concatenate([p["region"] for p in parts]))
  arrays = common.load_npz(path)
  by_image = {}
  for index, region, cls in zip(arrays["index"], arrays["region"], arrays["classes"]):
    by_image.setdefault(int(index), {})[int(region)] = int(cls)
  return {index: np.asarray([regions[r] for r in sorted(regions)]) for index, regions in by_image.items()}


def write_predictions(run: Run, classes: dict[int, np.ndarray]) -> None:
  palette = viz.voc_palette()
  ids = run.ids
  owned = np.concatenate([run.chunk(c) for c in run.owned()]) if run.owned() else np.zeros(0, np.int64)
  for index in tqdm.tqdm(owned, desc="predictions", unit="image"):
    image_id = ids[int(index)]
    path = _mask_path(run, "predictions", image_id)
    if path.exists():
      continue
    region_map, count = _regions(run, image_id)
    region_classes = classes.get(int(index), np.zeros(0, np.int64))
    if len(region_classes) != count:
      raise RuntimeError(f"{path}: {count} regions but {len(region_classes)} classes; delete "
                         f"{run.workdir / 'levels' / 'classes.npz'} and the descriptors to relabel")
    common.save_png(path, framework.label_map(region_map, region_classes), palette=palette)


# ---- stage 7: evaluation and the report ------------------------------------------------------------

def evaluate(run: Run) -> dict:
  """Scores the written predictions and masks; writes metrics.json and the gallery."""
  stats = [common.load_npz(run.path("fg_stats", c)) for c in range(run.num_chunks)]
  keep = np.concatenate([s["index"] for s in stats]) >= 0
  counts = np.concatenate([s["counts"] for s in stats])[keep]
  has_gt = np.concatenate([s["has_gt"] for s in stats])[keep]
  fg_pixels = np.concatenate([s["fg_pixels"] for s in stats])[keep]
  pixels = np.concatenate([s["pixels"] for s in stats])[keep]
  order = np.concatenate([s["index"] for s in stats])[keep]
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
    result.update(_semantic_scores(run, order[has_gt]))
  result["seconds"] = dict(run.timings)
  result["seconds_per_image"] = {k: v / max(result["num_images"], 1) for k, v in run.timings.items()}
  result["config"] = json.loads(run.config.to_json())
  common.save_json(run.workdir / "metrics.json", result)
  _write_gallery(run, order, per_image_iou)
  return result


def _semantic_scores(run: Run, indices: np.ndarray) -> dict:
  ids = run.ids
  names = jaxseg.data.class_names(run.config.data.name)
  total = None
  for index in tqdm.tqdm(indices, desc="evaluation", unit="image"):
    pred = common.read_png_indices(_mask_path(run, "predictions", ids[int(index)]))
    gt = run.source[int(index)]["mask"]
    total = metrics.accumulate(total, metrics.confusion_matrix(pred, gt, run.method.num_classes + 1, len(names)))
  scores = metrics.hungarian_scores(total)
  present = np.asarray(scores["present"])
  return dict(miou=float(scores["miou"]), pixel_accuracy=float(scores["pixel_accuracy"]),
              per_class_iou={name: float(iou) for name, iou, p in zip(names, scores["per_class_iou"], present) if p},
              assignment=np.asarray(scores["assignment"]).tolist())


def _write_gallery(run: Run, order: np.ndarray, per_image_iou: np.ndarray | None) -> None:
  """gallery.html with the worst images first (by foreground IoU) and gallery/*.png overlays."""
  ids = run.ids
  if per_image_iou is not None:
    chosen = np.argsort(per_image_iou, kind="stable")[:run.config.gallery_size]
  else:
    chosen = np.arange(min(len(order), run.config.gallery_size))
  rows = []
  for rank, position in enumerate(chosen):
    item = run.source[int(order[position])]
    pred = common.read_png_indices(_mask_path(run, "predictions", item["id"]))
    panels = {"image": item["image"], "prediction": viz.overlay(item["image"], pred)}
    if "mask" in item:
      panels["truth"] = viz.overlay(item["image"], item["mask"])
    files = []
    for name in ("image", "truth", "prediction"):
      if name in panels:
        files.append(f"gallery/{rank:04d}_{name}.png")
        common.save_png(run.workdir / files[-1], _thumbnail(panels[name]))
    score = None if per_image_iou is None else float(per_image_iou[position])
    rows.append(viz.GalleryRow(item["id"], score, files))
  columns = ("image", "ground truth", "prediction") if per_image_iou is not None else ("image", "prediction")
  html = viz.gallery_html(rows, columns, title=f"jaxseg: {run.config.data.name} {run.config.data.split}, "
                          "worst foreground IoU first")
  common.atomic_write_bytes(run.workdir / "gallery.html", html.encode())


def _thumbnail(image: np.ndarray, side: int = 320) -> np.ndarray:
  """Shrinks image [H, W, 3] so its longer side is at most `side` pixels (nearest, keeps label colours)."""
  step = max(1, -(-max(image.shape[:2]) // side))
  return image[::step, ::step]


# ---- the whole run ----------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs (or resumes) the method on config.data and returns the metrics written to workdir/metrics.json."""
  workdir = pathlib.Path(workdir).expanduser()
  method = method_config(config)
  data = config.data
  source = distributed.main_first("data", lambda: jaxseg.data.load(  # one process prepares a shared data_dir
      data.name, data.split or None, data_dir=pathlib.Path(data.data_dir).expanduser(),
      manual_dir=pathlib.Path(data.manual_dir).expanduser() if data.manual_dir else None))
  count = len(source) if not data.limit else min(data.limit, len(source))
  if count == 0:
    raise ValueError(f"{data.name} split {data.split!r} has no images")
  params, vit = distributed.main_first("weights", lambda: models.load_params(
      config.model.weights, config.model.variant, seed=config.seed, cache_dir=config.model.cache_dir or None))
  if config.model.weights == "random":
    logging.warning("=" * 70 + "\nmodel.weights=random: RANDOMLY INITIALISED ViT. The masks and scores of this "
                    "run are MEANINGLESS (a smoke run).\n" + "=" * 70)
  if config.image_size % vit.patch_size:
    raise ValueError(f"image_size={config.image_size} is not a multiple of {config.model.variant}'s patch size "
                     f"{vit.patch_size}")
  process = distributed.process()
  workdir.mkdir(parents=True, exist_ok=True)
  if process[0] == 0:
    for stale in workdir.rglob(".*.tmp"):  # left by a killed run's atomic writes
      stale.unlink()
  distributed.barrier("start")  # no process writes before the stale files are gone
  _check_config(workdir, config)
  timings_path = workdir / "timings.json"
  timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
  mesh = parallel.batch_mesh(jax.local_devices())
  r = Run(config=config, workdir=workdir, method=method, source=source, indices=np.arange(count),
          params=parallel.replicate(params, mesh), vit=vit, key=jax.random.key(config.seed), timings=timings,
          mesh=mesh, process=process)
  logging.info("%d images in %d chunks of %d; process %d of %d; %d devices; workdir %s", count, r.num_chunks,
               config.batch_size, *process, mesh.size, workdir)
  with _stage(r, "features"):
    extract_features(r)
  with _stage(r, "dataset_level"):
    dataset = _main_first("dataset level", lambda: _dataset_level(r))
  with _stage(r, "category_level"):
    category_centroids, category_prototypes = _main_first("category level", lambda: _category_level(r, dataset))
  with _stage(r, "image_level_fusion"):
    image_level_and_fusion(r, dataset, category_centroids, category_prototypes)
  with _stage(r, "refinement"):
    refine_masks(r)
  with _stage(r, "labeling"):
    describe_regions(r)
    classes = _main_first("classes", lambda: classify_regions(r))
    write_predictions(r, classes)
  result = _main_first("report", lambda: evaluate(r) if r.is_main else json.loads(
      (workdir / "metrics.json").read_text()))
  distributed.barrier("done")  # no process exits (ending the distributed runtime) while others still work
  return result


def _main_first(name: str, compute):
  """compute() on process 0, which writes its result to the workdir, then on the others, which read it.

  A barrier before compute() makes every process's chunks of the previous pass visible on the shared workdir.
  """
  distributed.barrier(f"before {name}")
  return distributed.main_first(name, compute)

"""Which backbone, block and feature separates foreground from background: the analyze_features runner's work.

For every backbone of the config, the ViT runs once over each of two splits
(`encode` with every requested block returned):

  1. the probe split (data.probe_split): a reservoir sample of at most
     `probe.samples` labelled patches, the same patches for every (block,
     feature) cell, then one logistic-regression probe per cell;
  2. the scored split (data.split), batch by batch: per-image 2-means of each
     cell (foreground by the method's prior, and the better of the two
     clusters), the probes' masks, and the method's own feature written to a
     float16 cache on disk, on which the framework's levels then run
     (`jaxseg.framework.segment_features`, streaming from the cache).

Every score is at patch level against `probe.patch_labels` (a patch is
foreground when most of its labelled pixels are; mostly-void patches are
ignored) and summed over the split: IoU = sum of intersections / sum of
unions, as the segment runner's fg_iou. "cls-attention" is the last block's
CLS-to-patch attention (mean over heads), a scalar per patch: its 2-means is
a Euclidean 2-means of the scalar (a threshold), its probe a 1-D logistic
regression; the ViT exposes it for the last block only, so it has one row.
Memory: at most batch_size images' block outputs, plus probe.samples x
(D + 1) float32 per cell (ViT-B, 12 blocks x 4 features, 10k samples: 1.5 GB).
Disk, while a backbone runs: N x h x w x D float16 (VOC val, ViT-B/14 at 448:
2.3 GB; ViT-B/8: 7 GB).

Each backbone is a pass of experiments/engine.py, as the segment runner's passes: its fingerprint covers
the config fields that change its results, the code it runs (analysis.py and the jaxseg modules of _CODE)
and the content of both splits (images and labels, experiments/passes/source.py), so a rerun reuses a
backbone exactly when nothing it depends on changed and recomputes it otherwise; its files' sizes and
checksums are checked before reuse; the workdir is locked while the analysis runs.

Workdir layout:

    backbones/<name>.json        rows and framework scores of a finished backbone
    backbones/<name>.npz         CLS attention and 2-means masks of the first figure_images images
    backbones/.<name>.features.tmp  float16 cache of the method's feature while a backbone runs (then deleted)
    manifests/                   the engine's fingerprints and decisions (last_start.json)
    analysis.csv, analysis.md    one row per (backbone, layer, feature)
    figures/heatmap_<name>.png   block x feature heat map of every score
    figures/examples.png         per image: the image, the ground truth, per backbone CLS attention and 2-means
"""

import csv
import dataclasses
import functools
import io
import json
import math
import pathlib
import zlib

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import tqdm
from absl import logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

import jaxseg.data
from experiments import common
from experiments import engine
from experiments.errors import UserValueError
from experiments.passes import Pass
from experiments.passes import source as source_pass
from experiments.passes.context import RunContext
from experiments.passes.context import digest
from jaxseg import models
from jaxseg.cluster.stream import reservoir_add
from jaxseg.cluster.stream import reservoir_init
from jaxseg.cluster.stream import reservoir_sorted
from jaxseg.framework import probe
from jaxseg.framework.config import MethodConfig
from jaxseg.framework.features import PatchFeatures
from jaxseg.framework.features import border_patches
from jaxseg.framework.features import patch_features
from jaxseg.framework.features import unit_length
from jaxseg.framework.levels import patch_ids
from jaxseg.framework.compose import segment_features

FEATURES = ("q", "k", "v", "tokens", "cls-attention")
SCORES = ("two_means_prior_iou", "two_means_oracle_iou", "probe_accuracy", "probe_iou")
LEVELS = ("dataset", "category", "image", "fused")
FRAMEWORK_SCORES = tuple(f"framework_{level}_iou" for level in LEVELS)
COLUMNS = ("backbone", "layer", "feature", *SCORES, *FRAMEWORK_SCORES)
# Config fields that change no backbone's results: which backbones run, the figures, and where files are
# (the splits' content is in their fingerprints).
_NOT_RESULTS = ("backbones", "figure_images", "model.cache_dir", "data.data_dir", "data.manual_dir")
# The code a backbone's pass runs (Pass.code).
_CODE = ("experiments/analysis.py", "jaxseg/models", "jaxseg/cluster", "jaxseg/framework/probe.py",
         "jaxseg/framework/features.py", "jaxseg/framework/levels.py", "jaxseg/framework/compose.py",
         "jaxseg/framework/fusion.py", "jaxseg/data/images.py", "jaxseg/data/batching.py")
SPLITS = ("scored", "probe")  # the roots of the graph: the scored split and the probe split


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (block, feature) of a backbone, a row of analysis.csv; block is 0-based."""
  block: int
  feature: str

  @property
  def metric(self) -> str:
    """k-means metric of its 2-means: spherical as the method for vectors, Euclidean for the scalar attention."""
    return "euclidean" if self.feature == "cls-attention" else "cosine"


@dataclasses.dataclass
class Backbone:
  """One backbone's model and the cells analysed on it."""
  name: str
  params: object
  vit: models.ViTConfig
  cells: list[Cell]
  side: int  # patches per image side

  @property
  def blocks(self) -> tuple[int, ...]:
    """Blocks whose outputs encode returns (cls-attention comes with every output)."""
    return tuple(sorted({c.block for c in self.cells if c.feature != "cls-attention"}))

  @property
  def grid(self) -> tuple[int, int]:
    return self.side, self.side


def cells(config: ml_collections.ConfigDict, vit: models.ViTConfig, name: str) -> list[Cell]:
  """The (block, feature) cells of a backbone: config.blocks (() = all) x config.features."""
  unknown = sorted(set(config.features) - set(FEATURES))
  if unknown or not config.features:
    raise UserValueError(f"config.features: unknown {unknown} (or empty); choose from {FEATURES}")
  blocks = config.blocks or range(vit.depth)
  bad = [b for b in blocks if not -vit.depth <= b < vit.depth]
  if bad:
    raise UserValueError(f"config.blocks {bad} out of range for {name} (depth {vit.depth})")
  blocks = sorted({b % vit.depth for b in blocks})
  out = [Cell(b, f) for b in blocks for f in config.features if f != "cls-attention"]
  if "cls-attention" in config.features:
    out.append(Cell(vit.depth - 1, "cls-attention"))
  return out


@functools.partial(jax.jit, static_argnames=("vit", "dtype", "blocks", "feature"))
def _encode(params, images, valid, *, vit, dtype, blocks, feature):
  """(ViTOutput with `blocks`, the method's PatchFeatures) of one batch."""
  out = models.encode(params, images, vit, dtype=dtype, return_blocks=blocks)
  return out, patch_features(out, feature, valid)


def _cell_features(out, cell: Cell) -> jax.Array:
  """[B, P, D] the cell's feature per patch: unit length, or the raw scalar CLS attention (D = 1)."""
  if cell.feature == "cls-attention":
    attention = jnp.mean(out.cls_attention, axis=1)
    return attention.reshape(attention.shape[0], -1, 1)
  x = unit_length(out.blocks[cell.block][cell.feature])
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _batch_labels(batch: dict, grid: tuple[int, int], split: str) -> tuple[np.ndarray, np.ndarray]:
  """([B, P] bool foreground, [B, P] bool counted) patch labels of a batch's ground-truth masks."""
  size = len(batch["valid"])
  target = np.zeros((size, grid[0] * grid[1]), bool)
  counted = np.zeros_like(target)
  for slot, (valid, mask) in enumerate(zip(batch["valid"], batch["mask"])):
    if not valid:
      continue
    if mask is None:
      raise UserValueError(f"image {batch['id'][slot]!r} of split {split!r} has no ground-truth mask; the "
                       "analysis needs a labelled split")
    labels = probe.patch_labels(mask, grid).reshape(-1)
    target[slot], counted[slot] = labels == 1, labels >= 0
  return target, counted


def _batches(config, source, count: int, backbone: Backbone, desc: str):
  stream = jaxseg.data.batches(source, batch_size=config.batch_size, image_size=config.image_size,
                               patch_size=backbone.vit.patch_size, indices=np.arange(count),
                               mean=backbone.vit.mean, std=backbone.vit.std)
  return tqdm.tqdm(stream, total=-(-count // config.batch_size), desc=f"{backbone.name}: {desc}", unit="batch")


def _run_batch(config, backbone: Backbone, method: MethodConfig, batch: dict):
  return _encode(backbone.params, jnp.asarray(batch["image"]), jnp.asarray(batch["valid"]), vit=backbone.vit,
                 dtype=jnp.dtype(config.model.dtype), blocks=backbone.blocks, feature=method.feature)


# ---- pass 1: probes ---------------------------------------------------------------------------------

def fit_probes(config, backbone: Backbone, method: MethodConfig, source, count: int,
               key: jax.Array) -> dict[Cell, probe.Probe]:
  """One probe per cell, fitted on a reservoir sample of the probe split's labelled patches."""
  sample_key, fit_key = jax.random.split(key)
  samples = {}
  for number, batch in enumerate(_batches(config, source, count, backbone, "probe split")):
    out, features = _run_batch(config, backbone, method, batch)
    target, counted = _batch_labels(batch, backbone.grid, config.data.probe_split)
    labelled = jnp.asarray(counted.reshape(-1))
    label_column = jnp.asarray(target.reshape(-1, 1), jnp.float32)
    for cell in backbone.cells:
      x = _cell_features(out, cell)
      points = jnp.concatenate([x.reshape(-1, x.shape[-1]), label_column], axis=1)
      if cell not in samples:
        samples[cell] = reservoir_init(config.probe.samples, points.shape[1])
      # One key for every cell and batch, priorities per patch id: every cell samples the same patches,
      # whatever the batch size.
      samples[cell] = reservoir_add(samples[cell], points, key=sample_key, mask=labelled,
                                    ids=patch_ids(features, number * config.batch_size))
  probes = {}
  for number, cell in enumerate(tqdm.tqdm(backbone.cells, desc=f"{backbone.name}: probes", unit="cell")):
    sample = reservoir_sorted(samples[cell])  # in an order that does not depend on the batching
    if not bool(jnp.any(sample.mask)):
      raise UserValueError(f"split {config.data.probe_split!r} has no labelled patch to fit a probe on")
    probes[cell] = probe.fit_probe(sample.points[:, :-1], sample.points[:, -1] > 0.5, sample.mask,
                                   key=jax.random.fold_in(fit_key, number), steps=config.probe.steps,
                                   learning_rate=config.probe.learning_rate, l2=config.probe.l2,
                                   batch_size=config.probe.batch_size or None)
  return probes


# ---- pass 2: scores on the scored split --------------------------------------------------------------

class _FeatureCache:
  """[N, h, w, D] float16 .npy on disk, read back as float32 slices (a PatchFeatures field segment_features streams)."""

  def __init__(self, path: pathlib.Path, shape: tuple[int, ...]):
    path.parent.mkdir(parents=True, exist_ok=True)
    self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.array.shape

  def __getitem__(self, index) -> np.ndarray:
    return np.asarray(self.array[index], np.float32)


def score_split(config, backbone: Backbone, method: MethodConfig, probes: dict, source, count: int,
                key: jax.Array, cache_path: pathlib.Path) -> dict:
  """Pass 2. Returns {"counts": {score: {cell: [4] int64}}, "framework": {level: iou}, "examples": {...}}."""
  two_means_key, framework_key = jax.random.split(key)
  h, w = backbone.grid
  figure_count = min(config.figure_images, count)
  totals = {name: {cell: np.zeros(4, np.int64) for cell in backbone.cells} for name in ("prior", "oracle", "probe")}
  cache = _FeatureCache(cache_path, (count, h, w, backbone.vit.dim))
  cls, attention, valid, targets, counteds = [], [], [], [], []
  examples = dict(attention=np.zeros((figure_count, h, w), np.float32), mask=np.zeros((figure_count, h, w), bool))
  two_means = functools.partial(probe.two_means_counts, fg_prior=method.fg_prior, n_init=config.two_means.n_init,
                                max_iter=config.two_means.max_iter, tol=config.two_means.tol)
  for number, batch in enumerate(_batches(config, source, count, backbone, "scored split")):
    out, features = _run_batch(config, backbone, method, batch)
    target, counted = _batch_labels(batch, backbone.grid, config.data.split)
    patch_valid = features.valid.reshape(len(target), -1)
    border = border_patches(features.valid).reshape(patch_valid.shape)
    patch_attention = features.attention.reshape(patch_valid.shape)
    positions = number * config.batch_size + np.arange(len(target))  # each image's 2-means keyed by the image
    batch_key = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(two_means_key, jnp.asarray(positions))
    for cell in backbone.cells:
      x = _cell_features(out, cell)
      result = two_means(x, patch_valid, border, patch_attention, target, counted, key=batch_key, metric=cell.metric)
      totals["prior"][cell] += np.asarray(result.prior, np.int64).sum(0)
      totals["oracle"][cell] += np.asarray(result.oracle, np.int64).sum(0)
      totals["probe"][cell] += np.asarray(probe.probe_counts(probes[cell], x, target, counted), np.int64).sum(0)
    keep = np.asarray(batch["valid"])
    start = number * config.batch_size
    cache.array[start:start + keep.sum()] = np.asarray(features.patches, np.float16)[keep]
    cls.append(np.asarray(features.cls)[keep])
    attention.append(np.asarray(features.attention)[keep])
    valid.append(np.asarray(features.valid)[keep])
    targets.append(target[keep].reshape(-1, h, w))
    counteds.append(counted[keep].reshape(-1, h, w))
    if start < figure_count:
      shown = slice(0, min(figure_count - start, int(keep.sum())))
      mask = two_means(features.patches.reshape(*patch_valid.shape, -1), patch_valid, border, patch_attention,
                       target, counted, key=batch_key).prior_mask
      examples["attention"][start:start + shown.stop] = np.asarray(features.attention)[shown]
      examples["mask"][start:start + shown.stop] = np.asarray(mask).reshape(-1, h, w)[shown]
  cache.array.flush()
  target, counted = np.concatenate(targets), np.concatenate(counteds)
  if not counted.any():
    raise UserValueError(f"split {config.data.split!r} has no labelled patch to score")
  split_features = PatchFeatures(patches=cache, cls=jnp.asarray(np.concatenate(cls)),
                                 attention=jnp.asarray(np.concatenate(attention)),
                                 valid=jnp.asarray(np.concatenate(valid)))
  framework = framework_scores(split_features, target, counted, method, key=framework_key,
                               batch_size=config.batch_size)
  return dict(counts=totals, framework=framework, examples=examples)


def framework_scores(features: PatchFeatures, target: np.ndarray, counted: np.ndarray, method: MethodConfig, *,
                     key: jax.Array, batch_size: int) -> dict[str, float]:
  """{level: patch-level fg IoU over the split} of the method's dataset, category, image levels and fusion.

  Args:
    features: [N, ...] the split's PatchFeatures (patches may be a `_FeatureCache`).
    target, counted: [N, h, w] bool patch labels.
    method: the method's config.
    key: PRNG key.
    batch_size: images per streamed batch.
  """
  result = segment_features(features, method, key=key, batch_size=batch_size)
  level_masks = np.concatenate([np.asarray(result.level_masks), np.asarray(result.fg_mask)[None]])
  counts = [np.asarray(probe.binary_counts(jnp.asarray(mask), jnp.asarray(target), jnp.asarray(counted)), np.int64)
            for mask in level_masks]
  return {level: probe.count_scores(c.sum(0))["iou"] for level, c in zip(LEVELS, counts)}


def backbone_rows(name: str, backbone: Backbone, method: MethodConfig, scored: dict) -> list[dict]:
  """CSV rows of one backbone: the scores of every cell; the framework's on (last block, method feature)."""
  rows = []
  for cell in backbone.cells:
    prior, oracle, probed = (probe.count_scores(scored["counts"][kind][cell]) for kind in ("prior", "oracle", "probe"))
    row = dict(backbone=name, layer=cell.block, feature=cell.feature, two_means_prior_iou=prior["iou"],
               two_means_oracle_iou=oracle["iou"], probe_accuracy=probed["accuracy"], probe_iou=probed["iou"])
    rows.append(row)
  default = next((r for r in rows if r["layer"] == backbone.vit.depth - 1 and r["feature"] == method.feature), None)
  if default is None:  # the method's cell was not analysed: a row of framework scores only
    default = dict(backbone=name, layer=backbone.vit.depth - 1, feature=method.feature)
    rows.append(default)
  default.update({f"framework_{level}_iou": iou for level, iou in scored["framework"].items()})
  return [{column: row.get(column) for column in COLUMNS} for row in rows]


# ---- the run ----------------------------------------------------------------------------------------

def _settings(config: ml_collections.ConfigDict) -> dict:
  """{dotted field: value} of every config field that changes a backbone's results."""
  return {name: value for name, value in common.config_items(json.loads(config.to_json()))
          if name not in _NOT_RESULTS}


def _load(data, split: str):
  return jaxseg.data.load(data.name, split, data_dir=pathlib.Path(data.data_dir).expanduser(),
                          manual_dir=pathlib.Path(data.manual_dir).expanduser() if data.manual_dir else None)


def _count(source, limit: int, split: str, name: str) -> int:
  count = len(source) if not limit else min(limit, len(source))
  if count == 0:
    raise UserValueError(f"{name} split {split!r} has no images")
  return count


def analyze_backbone(config, name: str, workdir: pathlib.Path, method: MethodConfig, sources, counts,
                     key: jax.Array) -> None:
  """Computes one backbone's analysis into workdir/backbones/<name>.json (CSV rows) and .npz (examples)."""
  result_path = workdir / "backbones" / f"{name}.json"
  params, vit = models.load_params(config.model.weights, name, seed=config.seed,
                                   cache_dir=config.model.cache_dir or None)
  backbone = Backbone(name, params, vit, cells(config, vit, name), side=config.image_size // vit.patch_size)
  probe_key, score_key = jax.random.split(key)
  probes = fit_probes(config, backbone, method, sources["probe"], counts["probe"], probe_key)
  cache_path = workdir / "backbones" / f".{name}.features.tmp"  # a killed run's is removed by the next start
  try:
    scored = score_split(config, backbone, method, probes, sources["scored"], counts["scored"], score_key,
                         cache_path)
  finally:
    cache_path.unlink(missing_ok=True)
  rows = backbone_rows(name, backbone, method, scored)
  common.save_npz(workdir / "backbones" / f"{name}.npz", **scored["examples"])
  common.save_json(result_path, dict(rows=rows, framework=scored["framework"]))


def _split_root(config, split: str, source, count: int) -> engine.Root:
  """A split as a root of the graph: its images' content and labels (experiments/passes/source.py)."""
  images = source_pass.describe(source, count)
  return engine.Root(digest([split, source_pass.fingerprint(config, images), source_pass.label_fingerprint(images)]),
                     images, lambda old: source_pass.changes(old, images, identity=lambda e: {**e, "file": None}))


def backbone_pass(config, name: str, method: MethodConfig, sources, counts, key: jax.Array) -> Pass:
  """One backbone's analysis as a pass of the engine (its name: backbone_<name>)."""
  # Keyed by name, not position: a backbone's scores do not depend on the rest of the list.
  backbone_key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
  return Pass(f"backbone_{name}", SPLITS, lambda ctx: {**_settings(config), "backbone": name},
              (f"backbones/{name}.json", f"backbones/{name}.npz"),
              lambda ctx: analyze_backbone(config, name, ctx.workdir, method, sources, counts, backbone_key),
              code=_CODE)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[dict]:
  """Runs (or resumes) the analysis of config.backbones; writes the CSV, markdown and figures; returns the rows."""
  workdir = pathlib.Path(workdir).expanduser()
  method = MethodConfig.from_mappings(config.method.to_dict())
  for name in config.backbones:
    patch = models.get_variant(name).patch_size
    if config.image_size % patch:
      raise UserValueError(f"image_size={config.image_size} is not a multiple of {name}'s patch size {patch}; "
                       f"pick a multiple of {math.lcm(*(models.get_variant(b).patch_size for b in config.backbones))}")
  if config.model.weights == "random":
    logging.warning("=" * 70 + "\nmodel.weights=random: RANDOMLY INITIALISED ViTs. Every score of this analysis "
                    "is MEANINGLESS (a smoke run).\n" + "=" * 70)
  sources = {"scored": _load(config.data, config.data.split), "probe": _load(config.data, config.data.probe_split)}
  counts = {"scored": _count(sources["scored"], config.data.limit, config.data.split, config.data.name),
            "probe": _count(sources["probe"], config.data.probe_limit, config.data.probe_split, config.data.name)}
  if config.data.split == config.data.probe_split:
    logging.warning("data.probe_split == data.split (%r): the probe is scored on the patches it was fitted on",
                    config.data.split)
  roots = {split: _split_root(config, getattr(config.data, "split" if split == "scored" else "probe_split"),
                              sources[split], counts[split]) for split in SPLITS}
  key = jax.random.key(config.seed)
  graph = [backbone_pass(config, name, method, sources, counts, key) for name in config.backbones]
  ctx = RunContext(config=config, workdir=workdir, method=method, source=None, images=[], vit=None, key=key,
                   mesh=None)
  with engine.session(workdir, is_main=True):
    common.save_json(workdir / "config.json", json.loads(config.to_json()))
    engine.execute(graph, ctx, roots)
    rows = [row for name in config.backbones
            for row in json.loads((workdir / "backbones" / f"{name}.json").read_text())["rows"]]
    _write_report(workdir, config, rows, counts, sources["scored"], method)
  return rows


def _write_report(workdir: pathlib.Path, config, rows: list[dict], counts: dict, scored_source,
                  method: MethodConfig) -> None:
  """analysis.csv, analysis.md and the figures of the backbones in the config."""
  write_csv(workdir / "analysis.csv", rows)
  common.atomic_write_bytes(workdir / "analysis.md", markdown(rows, config, counts).encode())
  for name in config.backbones:
    save_figure(workdir / "figures" / f"heatmap_{name}.png", heatmaps([r for r in rows if r["backbone"] == name]))
  examples = {name: common.load_npz(workdir / "backbones" / f"{name}.npz") for name in config.backbones}
  save_figure(workdir / "figures" / "examples.png", example_grid(scored_source, examples, method.feature))


# ---- the report --------------------------------------------------------------------------------------

def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  """One row per (backbone, layer, feature); empty where a score was not measured."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
  common.atomic_write_bytes(path, buffer.getvalue().encode())


def _best(rows: list[dict], column: str) -> dict | None:
  scored = [r for r in rows if r.get(column) is not None]
  return max(scored, key=lambda r: r[column]) if scored else None


def markdown(rows: list[dict], config: ml_collections.ConfigDict, counts: dict) -> str:
  """analysis.md: the best cell of each score per backbone, then every row (best per backbone in bold)."""
  lines = ["# Feature analysis: foreground vs background", "",
           f"Scored on {config.data.name} {config.data.split!r} ({counts['scored']} images), probes fitted on "
           f"{config.data.probe_split!r} ({counts['probe']} images), image size {config.image_size}, weights "
           f"{config.model.weights!r}. Patch-level scores in percent; IoU summed over the split.", ""]
  if config.model.weights == "random":
    lines += ["**model.weights=random: randomly initialised ViTs, every score is meaningless (a smoke run).**", ""]
  backbones = list(dict.fromkeys(r["backbone"] for r in rows))
  lines += ["## Best cell per backbone", "", "| backbone | " + " | ".join(SCORES + FRAMEWORK_SCORES) + " |",
            "|---" * (1 + len(SCORES) + len(FRAMEWORK_SCORES)) + "|"]
  for name in backbones:
    own = [r for r in rows if r["backbone"] == name]
    cells_text = []
    for column in SCORES:
      best = _best(own, column)
      cells_text.append("" if best is None else f"{100 * best[column]:.1f} (block {best['layer']}, {best['feature']})")
    framework = _best(own, FRAMEWORK_SCORES[0]) or {}
    cells_text += ["" if framework.get(c) is None else f"{100 * framework[c]:.1f}" for c in FRAMEWORK_SCORES]
    lines.append(f"| {name} | " + " | ".join(cells_text) + " |")
  lines += ["", "## Every cell (best per backbone in bold)", "", "| " + " | ".join(COLUMNS) + " |",
            "|---" * len(COLUMNS) + "|"]
  best = {(name, column): _best([r for r in rows if r["backbone"] == name], column)
          for name in backbones for column in SCORES}
  for row in rows:
    cells_text = [str(row[c]) for c in ("backbone", "layer", "feature")]
    for column in SCORES + FRAMEWORK_SCORES:
      value = row[column]
      text = "" if value is None else f"{100 * value:.1f}"
      cells_text.append(f"**{text}**" if best.get((row["backbone"], column)) is row else text)
    lines.append("| " + " | ".join(cells_text) + " |")
  return "\n".join(lines) + "\n"


def save_figure(path: pathlib.Path, figure) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  plt.close(figure)
  common.atomic_write_bytes(path, buffer.getvalue())


def heatmaps(rows: list[dict]):
  """A figure with one block x feature heat map per score of one backbone's rows (blank = not measured)."""
  rows = [r for r in rows if r[SCORES[0]] is not None]
  blocks = sorted({r["layer"] for r in rows})
  features = [f for f in FEATURES if any(r["feature"] == f for r in rows)]
  size = (len(SCORES) * (1.8 + 0.6 * len(features)), 1.5 + 0.35 * len(blocks))
  figure, axes = plt.subplots(1, len(SCORES), figsize=size, squeeze=False)
  for ax, column in zip(axes[0], SCORES):
    grid = np.full((len(blocks), len(features)), np.nan)
    for r in rows:
      grid[blocks.index(r["layer"]), features.index(r["feature"])] = 100 * r[column]
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      if not np.isnan(value):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
    ax.set_xticks(range(len(features)), features, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("feature")
    ax.set_ylabel("block")
    ax.set_title(column.replace("_", " "), fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.05)
  figure.suptitle(f"{rows[0]['backbone']}: foreground/background separation (%)")
  return figure


def example_grid(source, examples: dict[str, dict[str, np.ndarray]], feature: str):
  """Rows = the first images of the scored split: image, ground truth, then per backbone CLS attention, 2-means."""
  count = min(len(e["attention"]) for e in examples.values())
  columns = 2 + 2 * len(examples)
  figure, axes = plt.subplots(max(count, 1), columns, figsize=(1.8 * columns, 1.8 * max(count, 1)), squeeze=False)
  titles = ["image", "ground truth"] + [t for name in examples for t in (f"{name}\nCLS attention",
                                                                          f"{name}\n2-means ({feature})")]
  for index in range(count):
    item = source[index]
    height, width = item["image"].shape[:2]
    gt = np.where(item["mask"] == 255, 0.5, (item["mask"] != 0).astype(float))
    panels = [item["image"], gt] + [p for e in examples.values() for p in (e["attention"][index], e["mask"][index])]
    for column, panel in enumerate(panels):
      ax = axes[index, column]
      cmap = None if column == 0 else ("inferno" if column >= 2 and column % 2 == 0 else "gray")
      ax.imshow(panel, cmap=cmap, interpolation="nearest", extent=(0, width, height, 0))
  for column, title in enumerate(titles):
    axes[0, column].set_title(title, fontsize=7)
  for ax in axes.reshape(-1):
    ax.set_axis_off()
  return figure

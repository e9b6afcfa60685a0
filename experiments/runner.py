"""The segment runner: the method of docs/design.md over a whole split, as the graph of passes in experiments/passes.

    result = runner.run(config, workdir)   # = workdir/metrics.json

A rerun of the same workdir recomputes exactly the passes whose inputs changed (experiments/engine.py):
a new num_classes only relabels, new crf.* values refine and relabel, an added or replaced image
recomputes what depends on the split; a killed run resumes. Layout of the workdir:

    config.json                 the resolved config of the latest start (informative; fingerprints decide reuse)
    manifests/<pass>.json       the fingerprint each pass's outputs were made under; last_start.json: decisions
    features/NNNNNN.npz         per chunk: unit patch features (float16), CLS, attention, valid, index
    levels/dataset.npz          stage 1: centroids, foreground flags, prototypes
    levels/category.npz         stage 2: category centroids and (bg, fg) prototypes
    margins/NNNNNN.npz          per chunk: per-level margins and scores, the fused fg probability
    masks/<id>.png              stage 5: refined binary mask at the image's resolution
    fg_stats/NNNNNN.npz         per chunk: fg intersection/union per level against the ground truth
    descriptors/NNNNNN.npz      stage 6: one descriptor per region
    levels/classes.npz          stage 6: the class of every region
    predictions/<id>.png        label map (VOC palette, 0 = background)
    metrics.json, gallery.html, gallery/  the report
    timings.json                seconds per pass, summed over the starts that computed its current outputs

With config.seeds (e.g. 0,1,2) features/ is computed once and every other pass runs once per seed s under
seeds/<s>/ (its own manifests/, levels/, ..., metrics.json, timings.json); metrics.json then holds the
summary: "seeds": {"values", "mean", "std" (ddof=1), "per_seed"} of miou, pixel_accuracy, fg_iou(_levels).

Devices and hosts: the per-chunk passes run data-parallel over the process's local devices
(jaxseg.parallel); a chunk is padded with invalid images to a multiple of the device count for the
computation only, so the cache is the same for any number of devices. With several processes
(experiments/distributed.py) the workdir must be shared: process p computes the chunks c with
c % count == p, and process 0 fits the dataset-wide levels and classes and writes the report.
"""

import dataclasses
import json
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

import jaxseg.data
from experiments import common
from experiments import distributed
from experiments import engine
from experiments import passes
from experiments import validation
from experiments.errors import UserError
from experiments.passes import source as source_pass
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg import models
from jaxseg import parallel

SEEDS = "seeds"  # with config.seeds: workdir/seeds/<s>/ holds every pass but the features, for seed s


def method_config(config: ml_collections.ConfigDict) -> framework.MethodConfig:
  return framework.MethodConfig.from_mappings(config.method.to_dict(), config.crf.to_dict())


def _load_source(config: ml_collections.ConfigDict):
  data = config.data
  return distributed.main_first("data", lambda: jaxseg.data.load(  # one process prepares a shared data_dir
      data.name, data.split or None, data_dir=pathlib.Path(data.data_dir).expanduser(),
      manual_dir=pathlib.Path(data.manual_dir).expanduser() if data.manual_dir else None))


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs (or resumes, or updates) the method on config.data; returns the metrics written to workdir/metrics.json.

  Raises:
    UserError: a config or workdir that cannot make a run (before any data or weights are read), an empty split,
      a workdir that cannot be written (a full disk, permissions): its message names the path.
  """
  workdir = pathlib.Path(workdir).expanduser()
  validation.validate(config, workdir)
  try:
    return _run(config, workdir)
  except OSError as e:
    if e.filename is None or not pathlib.Path(e.filename).absolute().is_relative_to(workdir.absolute()):
      raise
    raise UserError(f"cannot write {e.filename}: {e.strerror or e} (free space or permissions under the workdir "
                    f"{workdir}); every file is written whole or not at all, so a rerun resumes") from e


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  with distributed.guard():
    method = method_config(config)
    source = _load_source(config)
    count = len(source) if not config.data.limit else min(config.data.limit, len(source))
    if count == 0:
      raise UserError(f"config.data.name={config.data.name!r} split {config.data.split!r} has no images")
    if config.model.weights == "random":
      logging.warning("=" * 70 + "\nmodel.weights=random: RANDOMLY INITIALISED ViT. The masks and scores of this "
                      "run are MEANINGLESS (a smoke run).\n" + "=" * 70)
    effective = framework.effective_method(method, count)
    if effective.num_categories < method.num_categories:
      logging.warning("method.num_categories=%d but the split has %d images: using %d categories",
                      method.num_categories, count, effective.num_categories)
    images = source_pass.describe(source, count, engine.recorded_root(workdir, passes.SEGMENT[0].name, passes.SOURCE))
    mesh = parallel.batch_mesh(jax.local_devices())
    ctx = RunContext(config=config, workdir=workdir, method=effective, source=source, images=images,
                     vit=models.get_variant(config.model.variant), key=jax.random.key(config.seed), mesh=mesh,
                     process=distributed.process(), effective={"num_categories": effective.num_categories},
                     seed=config.seed)
    logging.info("%d images in %d chunks of %d; process %d of %d; %d devices; workdir %s", count, ctx.num_chunks,
                 config.batch_size, *ctx.process, mesh.size, workdir)
    with engine.session(workdir, ctx.is_main):
      if ctx.is_main:
        common.save_json(workdir / "config.json", json.loads(config.to_json()))
      sources = {passes.SOURCE: engine.Root(source_pass.fingerprint(config, images), images,
                                            lambda old: source_pass.changes(old, images)),
                 passes.LABELS: engine.Root(source_pass.label_fingerprint(images), source_pass.labels(images),
                                            lambda old: source_pass.label_changes(old, images))}
      if not config.seeds:
        engine.execute(passes.SEGMENT, ctx, sources)
      else:
        _run_seeds(ctx, sources)
      result = json.loads((workdir / "metrics.json").read_text())
      distributed.barrier("done")  # no process exits (ending the distributed runtime) while others still work
  return result


def _run_seeds(ctx: RunContext, sources: dict[str, engine.Root]) -> None:
  """The features once (in workdir), then every other pass per seed in workdir/seeds/<s>, then the summary.

  Each seed's passes have their own manifests and fingerprints (under seeds/<s>/), so adding a seed to
  config.seeds runs only the new seed's passes; a seed dropped from the list keeps its folder, unreported.
  """
  features, per_seed = passes.SEGMENT[0], passes.SEGMENT[1:]
  engine.execute((features,), ctx, sources)
  cache = engine.Root(ctx.fingerprints[features.name], None, lambda old: "the feature cache was recomputed")
  for seed in ctx.config.seeds:
    logging.info("seed %d of %s", seed, list(ctx.config.seeds))
    seed_ctx = dataclasses.replace(ctx, workdir=ctx.workdir / SEEDS / str(seed), shared=ctx.workdir, seed=seed,
                                   key=jax.random.key(seed), fingerprints={}, field_digests={}, timings={})
    engine.execute(per_seed, seed_ctx, {**sources, features.name: cache})
  if ctx.is_main:
    per_seed_metrics = [json.loads((ctx.workdir / SEEDS / str(s) / "metrics.json").read_text())
                        for s in ctx.config.seeds]
    timings = json.loads((ctx.workdir / "timings.json").read_text())
    common.save_json(ctx.workdir / "metrics.json", dict(
        num_images=len(ctx.images), seeds=seed_summary(list(ctx.config.seeds), per_seed_metrics),
        seconds={"features": timings.get(features.name, 0.0)}, config=json.loads(ctx.config.to_json())))
  distributed.barrier("seeds summary")  # every process returns the summary


def seed_summary(seeds: list[int], per_seed: list[dict]) -> dict:
  """{"values": seeds, "mean": {...}, "std": {...}, "per_seed": {...}} of the per-seed metrics' scores.

  Scores: miou, pixel_accuracy, fg_iou, fg_iou_levels (per level) and per_image_matching's miou and
  pixel_accuracy, those of the labelled splits;
  std is the sample standard deviation (ddof=1; 0.0 for a single seed), so "mIoU = mean +- std over n seeds".
  """
  flat = [{**{k: m[k] for k in ("miou", "pixel_accuracy", "fg_iou") if k in m},
           **{f"fg_iou_levels.{level}": v for level, v in m.get("fg_iou_levels", {}).items()},
           **{f"per_image_matching.{k}": m["per_image_matching"][k] for k in ("miou", "pixel_accuracy")
              if "per_image_matching" in m}} for m in per_seed]
  mean, std = {}, {}
  for name in flat[0] if flat else ():
    values = np.asarray([f[name] for f in flat], np.float64)
    *parent, leaf = name.split(".")
    for out, value in ((mean, values.mean()), (std, values.std(ddof=1) if len(values) > 1 else 0.0)):
      (out.setdefault(parent[0], {}) if parent else out)[leaf] = float(value)
  return dict(values=seeds, mean=mean, std=std, per_seed={str(s): f"{SEEDS}/{s}/metrics.json" for s in seeds})


def feature_cache(workdir: str | pathlib.Path) -> tuple[framework.PatchFeatures, list[str]]:
  """A finished run's feature cache as its passes read it (float32 patches): ([N, ...] PatchFeatures, N ids)."""
  parts = [common.load_npz(path) for path in sorted((pathlib.Path(workdir) / "features").glob("*.npz"))]
  keep = np.concatenate([p["index"] for p in parts]) >= 0
  stack = lambda name, dtype: np.concatenate([p[name] for p in parts]).astype(dtype)[keep]
  features = framework.PatchFeatures(patches=stack("patches", np.float32), cls=stack("cls", np.float32),
                                     attention=stack("attention", np.float32), valid=stack("valid", bool))
  return features, [str(i) for i in stack("id", str)]

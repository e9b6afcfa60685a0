"""The segment runner's passes and their graph: what each reads (passes, the source, config fields), writes.

    source -> features -> dataset_level -> category_level -> image_level -> refinement
           -> descriptors -> classes -> predictions -> report

A pass is a function of the run context (experiments.passes.context) that writes its outputs through it;
the engine (experiments.engine) decides from the fingerprints which passes run. Nothing here imports it.
"""

import dataclasses
from collections.abc import Callable

from experiments.passes import features
from experiments.passes import image_level
from experiments.passes import labeling
from experiments.passes import levels
from experiments.passes import refinement
from experiments.passes import report
from experiments.passes.context import RunContext
from jaxseg.framework import MethodConfig

SOURCE = "source"  # the images (ids, sizes, content hashes): experiments/passes/source.py
LABELS = "labels"  # their label maps' hashes


@dataclasses.dataclass(frozen=True)
class Pass:
  """One pass of a runner's graph.

  Attributes:
    name: also its key in fingerprints, timings and the workdir's manifests/.
    inputs: passes it reads (earlier in the graph), or the roots SOURCE (the images) and LABELS.
    fields: ctx -> {dotted config name: value} of every config value its outputs depend on.
    outputs: workdir paths (folders or files) it writes; deleted when its fingerprint changes.
    run: ctx -> None; writes the outputs, skipping units already current (a resumed run).
    per_chunk: runs on every process over its own chunks; else on process 0 alone (no collectives),
      and the others read its outputs from the workdir.
    keeps_units: its units carry their own fingerprints (features chunks depend only on their images),
      so a changed fingerprint recomputes only the units that changed instead of deleting the outputs.
    always: runs on every start (the report: cheap, shows the current config and timings).
    units: ctx -> the unit files it writes (chunks, per-image PNGs); a completed pass missing one of them
      (deleted by hand) is resumed, which remakes exactly the missing ones.
    code: globs (relative to the repository root) of the source files whose code makes its outputs: its own
      pass module and the jaxseg modules it runs. Their contents are in its fingerprint, so an edit or an
      upgrade recomputes the passes it touches. A glob naming a folder covers every .py file below it.
  """
  name: str
  inputs: tuple[str, ...]
  fields: Callable[[RunContext], dict]
  outputs: tuple[str, ...]
  run: Callable[[RunContext], None]
  per_chunk: bool = False
  keeps_units: bool = False
  always: bool = False
  units: Callable[[RunContext], list] = lambda ctx: []
  code: tuple[str, ...] = ()


# Method fields no pass names (e.g. one added to MethodConfig later) go into every pass that reads the method.
_CLAIMED = {"feature", "dataset_k", "fg_prior", "num_categories", "fusion", "score_temperature", "descriptor",
            "min_region_area", "min_region_fraction", "num_classes", "sample_budget", "kmeans_n_init", "kmeans_max_iter", "kmeans_tol", "crf"}


def _chunks(*folders: str) -> Callable[[RunContext], list]:
  return lambda ctx: [ctx.path(folder, c) for folder in folders for c in range(ctx.num_chunks)]


def _per_image(folder: str) -> Callable[[RunContext], list]:
  return lambda ctx: [ctx.image_path(folder, image["id"]) for image in ctx.images]


def _with_unclaimed(fields: Callable[[RunContext], dict]) -> Callable[[RunContext], dict]:
  unclaimed = tuple(f.name for f in dataclasses.fields(MethodConfig) if f.name not in _CLAIMED)
  return lambda ctx: {**fields(ctx), **levels.method_fields(ctx, *unclaimed)}


# The code each pass runs (Pass.code). Reading and decoding images (jaxseg/data) is in the source's content
# fingerprint, not here: a reader that changed but reads the same bytes changes no result.
_PIXELS = ("jaxseg/data/images.py", "jaxseg/data/batching.py")  # resize and normalise for the ViT
_VIT = ("jaxseg/models", "jaxseg/framework/features.py", *_PIXELS)
_LEVELS = ("jaxseg/cluster", "jaxseg/framework/features.py", "jaxseg/framework/levels.py",
           "jaxseg/framework/compose.py", "experiments/passes/levels.py")
_REFINE = ("jaxseg/framework/refine*", "jaxseg/crf", "jaxseg/metrics.py", "experiments/passes/refinement.py")
_LABELING = ("jaxseg/framework/labeling.py", "experiments/passes/labeling.py")

SEGMENT = (
    Pass(features.NAME, (SOURCE,), features.fields, ("features",), features.run, per_chunk=True, keeps_units=True,
         units=_chunks("features"), code=(*_VIT, "experiments/passes/features.py")),
    Pass(levels.DATASET, ("features",), _with_unclaimed(levels.dataset_fields), ("levels/dataset.npz",),
         levels.run_dataset, code=_LEVELS),
    Pass(levels.CATEGORY, ("features", levels.DATASET), _with_unclaimed(levels.category_fields),
         ("levels/category.npz",), levels.run_category, code=_LEVELS),
    Pass(image_level.NAME, ("features", levels.DATASET, levels.CATEGORY), _with_unclaimed(image_level.fields),
         ("margins",), image_level.run, per_chunk=True, units=_chunks("margins"),
         code=(*_LEVELS, "jaxseg/framework/fusion.py", "experiments/passes/image_level.py")),
    Pass(refinement.NAME, (SOURCE, LABELS, image_level.NAME), refinement.fields, ("masks", "fg_stats"), refinement.run,
         per_chunk=True, units=lambda ctx: _chunks("fg_stats")(ctx) + _per_image("masks")(ctx), code=_REFINE),
    Pass(labeling.DESCRIPTORS, (SOURCE, "features", refinement.NAME), _with_unclaimed(labeling.descriptor_fields),
         ("descriptors",), labeling.run_descriptors, per_chunk=True, units=_chunks("descriptors"),
         code=(*_VIT, *_LABELING)),
    Pass(labeling.CLASSES, (labeling.DESCRIPTORS,), _with_unclaimed(labeling.class_fields), ("levels/classes.npz",),
         labeling.run_classes, code=("jaxseg/cluster", *_LABELING)),
    Pass(labeling.PREDICTIONS, (refinement.NAME, labeling.CLASSES), labeling.prediction_fields, ("predictions",),
         labeling.run_predictions, per_chunk=True, units=_per_image("predictions"),
         code=("jaxseg/viz.py", *_LABELING)),
    Pass(report.NAME, (SOURCE, LABELS, refinement.NAME, labeling.PREDICTIONS), report.fields,
         ("metrics.json", "gallery.html", "gallery"), report.run, always=True),
)

"""Checks a run's config before any expensive work and before weights are downloaded.

    validation.validate(config, workdir)   # raises UserError naming the field, e.g.
    # config.method.fusion='medain' is not one of ('vote', 'intersection', 'mean')

Serves the segment configs (configs/_base.py) and the analysis config (configs/analyze_voc.py):
every field must be one the reference config has, every value in its allowed set or range;
image_size a multiple of each backbone's patch size (from models.VARIANTS, no weights needed);
weights 'hf', 'meta', 'random' or an existing file; a folder source an existing directory.
"""

import os
import pathlib

import ml_collections

from configs import _base
from configs import analyze_voc
from experiments import common
from experiments import workdir_lock
from experiments.errors import UserError
from jaxseg import models
from jaxseg.framework.config import DESCRIPTORS, FEATURES, FG_PRIORS, FUSIONS

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_SOURCES = ("hf", "meta", "random")
DATASETS = ("voc_seg", "coco_object", "skimage")  # or "folder:/path"
DATASET_SPLITS = ("train", "val")  # TFDS slices such as "val[:10]" too

CHOICES = {
    "model.dtype": DTYPES,
    "method.feature": FEATURES,
    "method.fg_prior": FG_PRIORS,
    "method.fusion": FUSIONS,
    "method.descriptor": DESCRIPTORS,
}


def _at_least(minimum):
  return lambda value: value >= minimum, f"must be >= {minimum}"


def _positive():
  return lambda value: value > 0, "must be > 0"


BOUNDS = {
    "image_size": _positive(),
    "seeds": (lambda value: all(type(s) is int for s in value) and len(set(value)) == len(value),
              "must be distinct integers, e.g. --config.seeds=0,1,2"),
    "batch_size": _at_least(1),
    "gallery_size": _at_least(0),
    "data.limit": _at_least(0),
    "data.probe_limit": _at_least(0),
    "method.dataset_k": _at_least(2),
    "method.num_categories": _at_least(1),
    "method.num_classes": (lambda value: 1 <= value <= 254, "must be in [1, 254]: uint8 labels, 0 = background, "
                           "255 = ignore"),
    "method.min_region_area": _at_least(0),
    "method.sample_budget": _at_least(1),
    "method.score_temperature": _positive(),
    "method.kmeans_n_init": _at_least(1),
    "method.kmeans_max_iter": _at_least(1),
    "method.kmeans_tol": _at_least(0),
    "crf.iterations": _at_least(0),
    "crf.max_side": _at_least(0),
    "crf.canvas_pixels": (lambda value: 4096 <= value <= 1 << 22, "must be in [4096, 4194304]"),
    "crf.gaussian_sxy": _positive(),
    "crf.bilateral_sxy": _positive(),
    "crf.bilateral_srgb": _positive(),
    "crf.gaussian_weight": _at_least(0),
    "crf.bilateral_weight": _at_least(0),
    "distributed.num_processes": _at_least(0),
    "distributed.process_id": _at_least(-1),
    "probe.samples": _at_least(1),
    "probe.steps": _at_least(1),
    "probe.learning_rate": _positive(),
    "probe.l2": _at_least(0),
    "probe.batch_size": _at_least(0),
    "two_means.n_init": _at_least(1),
    "two_means.max_iter": _at_least(1),
    "two_means.tol": _at_least(0),
    "figure_images": _at_least(0),
}


# The fields whose allowed values are not a CHOICES set or a BOUNDS range, in words.
OTHER_RULES = {
    "model.variant": "one of models.VARIANTS: " + ", ".join(sorted(models.VARIANTS)),
    "backbones": "each one of models.VARIANTS",
    "model.weights": ", ".join(WEIGHT_SOURCES) + " or a checkpoint file",
    "data.name": ", ".join(DATASETS) + " or folder:/path",
    "data.split": " or ".join(DATASET_SPLITS) + " for the datasets, sliced too: val[:10]; ignored for folders",
    "features": "each a feature of experiments.analysis.FEATURES",
    "blocks": "block indices, negative from the end; () = every block",
    "image_size": "> 0, a multiple of the patch size",
}


def allowed(field: str) -> str | None:
  """What a dotted config field accepts, in words, from the tables validate() checks; None if anything."""
  if field in CHOICES:
    return "one of " + ", ".join(CHOICES[field])
  if field in OTHER_RULES:
    return OTHER_RULES[field]
  if field in BOUNDS:
    return BOUNDS[field][1].removeprefix("must be ")
  return None


def field_help(config: ml_collections.ConfigDict) -> str:
  """One line per field of config: `name=default (allowed values)`, for the binaries' --helpfull."""
  lines = []
  for name, value in sorted(_fields(config).items()):
    rule = allowed(name)
    lines.append(f"{name}={value!r}" + (f" ({rule})" if rule else ""))
  return "\n".join(lines)


def _fields(config: ml_collections.ConfigDict) -> dict:
  return dict(common.config_items(config.to_dict()))


def _check_known_fields(fields: dict) -> None:
  reference = _fields(analyze_voc.get_config() if "backbones" in fields else _base.get_base_config())
  unknown, missing = sorted(set(fields) - set(reference)), sorted(set(reference) - set(fields))
  if unknown:
    raise UserError(f"unknown config field(s) {['config.' + f for f in unknown]}; the fields are those of "
                    f"configs/{'analyze_voc' if 'backbones' in fields else '_base'}.py")
  if missing:
    raise UserError(f"the config lacks field(s) {['config.' + f for f in missing]}")


def _check_values(fields: dict) -> None:
  for name, choices in CHOICES.items():
    if name in fields and fields[name] not in choices:
      raise UserError(f"config.{name}={fields[name]!r} is not one of {choices}")
  for name, (ok, requirement) in BOUNDS.items():
    if name in fields and not ok(fields[name]):
      raise UserError(f"config.{name}={fields[name]!r} {requirement}")
  if fields.get("method.sample_budget", 1) < fields.get("method.num_categories", 1):
    raise UserError(f"config.method.sample_budget={fields['method.sample_budget']} must be >= "
                    f"config.method.num_categories={fields['method.num_categories']}")
  processes, process_id = fields.get("distributed.num_processes", 0), fields.get("distributed.process_id", -1)
  if processes and process_id >= processes:
    raise UserError(f"config.distributed.process_id={process_id} must be < config.distributed.num_processes="
                    f"{processes}")
  address = fields.get("distributed.coordinator_address", "")
  if address and ":" not in address:
    raise UserError(f"config.distributed.coordinator_address={address!r} must be 'host:port'")
  if "features" in fields:
    from experiments.analysis import FEATURES as ANALYSIS_FEATURES  # noqa: PLC0415 - analysis configs only
    if not fields["features"] or set(fields["features"]) - set(ANALYSIS_FEATURES):
      raise UserError(f"config.features={tuple(fields['features'])!r}: each must be one of {ANALYSIS_FEATURES}")


def _check_model(fields: dict) -> None:
  variants = fields["backbones"] if "backbones" in fields else (fields["model.variant"],)
  field = "config.backbones" if "backbones" in fields else "config.model.variant"
  for variant in variants:
    if variant not in models.VARIANTS:
      raise UserError(f"{field}: {variant!r} is not one of {tuple(sorted(models.VARIANTS))}")
    patch = models.VARIANTS[variant].patch_size
    if fields["image_size"] % patch:
      raise UserError(f"config.image_size={fields['image_size']} is not a multiple of {variant}'s patch size "
                      f"{patch}; e.g. {fields['image_size'] // patch * patch or patch}")
    depth = models.VARIANTS[variant].depth
    bad = [b for b in fields.get("blocks", ()) if not -depth <= b < depth]
    if bad:
      raise UserError(f"config.blocks {bad} out of range for {variant} (depth {depth}: -{depth} .. {depth - 1})")
  weights = fields["model.weights"]
  if weights not in WEIGHT_SOURCES and not pathlib.Path(weights).is_file():  # read as given, as the loader does
    raise UserError(f"config.model.weights={weights!r} is neither one of {WEIGHT_SOURCES} nor an existing file")


def _check_data(fields: dict) -> None:
  name = fields["data.name"]
  if name.startswith("folder:"):
    folder = pathlib.Path(name[len("folder:"):]).expanduser()
    if not folder.is_dir():
      raise UserError(f"config.data.name={name!r}: {folder} is not a directory")
    return
  if name not in DATASETS:
    raise UserError(f"config.data.name={name!r} is not one of {DATASETS} nor 'folder:/some/path'")
  if name == "skimage":
    return
  for split_field in ("data.split", "data.probe_split"):
    if split_field in fields and fields[split_field].split("[", 1)[0] not in DATASET_SPLITS:
      raise UserError(f"config.{split_field}={fields[split_field]!r} is not one of {DATASET_SPLITS} "
                      "(optionally sliced, e.g. 'val[:10]')")
  manual_dir = fields.get("data.manual_dir", "")
  if manual_dir and not os.path.exists(os.path.expanduser(manual_dir)):
    raise UserError(f"config.data.manual_dir={manual_dir!r} does not exist")


def validate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> None:
  """Raises UserError, naming the field and value, if config (or workdir) cannot make a run.

  Reads no weights and no data; with a workdir, creates it if missing (workdir_lock.prepare).
  """
  fields = _fields(config)
  _check_known_fields(fields)
  _check_values(fields)
  _check_model(fields)
  _check_data(fields)
  if workdir is not None:
    workdir_lock.prepare(workdir)

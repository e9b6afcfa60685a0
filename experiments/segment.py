r"""Segment a dataset split with the multilevel clustering method, data-parallel over every local device.

  python -m experiments.segment --config=configs/demo.py --workdir=/tmp/jaxseg_demo

Several hosts: start the same command on every host with a shared --workdir and
--config.distributed.coordinator_address=HOST0:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I (or under Slurm / Open MPI, which JAX detects). If one process
fails, every process stops within seconds with a non-zero status (experiments/distributed.py).

A user error (bad config value, bad data or weights file, a workdir in use by another run) ends
with one line `error: ...` and exit status 2; --verbosity=1 also prints its traceback.
"""

if __name__ == "__main__":  # before the imports below: glibc reads its malloc tunables only at process start
  from experiments import hugepages
  hugepages.reexec_with_huge_pages()

import pathlib

from absl import app
from absl import flags
from absl import logging

from experiments import distributed
from experiments import errors
from experiments import runner
from experiments import validation
from experiments.common import load_config_file, run_with_help_exit_zero, use_xla_cache

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
_CONFIG = errors.define_config_file(
    str(_DEFAULT_CONFIG), "Path to an ml_collections config file (configs/*.py). Override any field with "
    f"--config.FIELD=VALUE; the fields, with {_DEFAULT_CONFIG.name}'s values:\n"
    + validation.field_help(load_config_file(_DEFAULT_CONFIG)))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for features, predictions, metrics and the gallery.")
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir", "~/.cache/jaxseg/xla", "Persistent XLA compilation cache (empty: none). The CRF compiles once "
    "per image-size bucket, so a rerun or a resumed run skips most compilation. A cold demo run writes 1.1 MB "
    "(26 programs, those that took 0.2 s or more to compile; measured 2026-12-02); the least recently used "
    "entries are deleted beyond --xla_cache_max_mb.")
_XLA_CACHE_MAX_MB = flags.DEFINE_integer("xla_cache_max_mb", 2048, "Bound on the XLA compilation cache's disk use, "
                                         "in MB (-1: unbounded).", lower_bound=-1)
flags.mark_flags_as_required(["workdir"])
flags.declare_key_flag("config")  # --help lists --config, with every config field, beside --workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  validation.validate(_CONFIG.value, _WORKDIR.value)  # runner.run validates too; this spares the config dump
  distributed.initialize(_CONFIG.value.distributed)  # before any JAX computation
  if _XLA_CACHE.value:
    use_xla_cache(_XLA_CACHE.value, _XLA_CACHE_MAX_MB.value)
  logging.info("workdir: %s (the full config goes to its config.json; --verbosity=1 also prints it here)",
               _WORKDIR.value)
  logging.debug("config:\n%s", _CONFIG.value)  # not by default: 40 lines would bury the one line that matters
  result = runner.run(_CONFIG.value, _WORKDIR.value)
  logging.info("done: %s; see %s/metrics.json and gallery.html", summary(result), _WORKDIR.value)


def summary(result: dict) -> str:
  """One line of runner.run's result: the scores, or with config.seeds their mean +- std over the seeds."""
  parts = [f"{result['num_images']} images"]
  seeds = result.get("seeds")
  if seeds:
    parts += [f"{k} = {seeds['mean'][k]:.4f} +- {seeds['std'][k]:.4f} over {len(seeds['values'])} seeds"
              for k in ("miou", "pixel_accuracy", "fg_iou") if k in seeds["mean"]]
  else:
    parts += [f"{k} = {result[k]:.4f}" for k in ("miou", "pixel_accuracy", "fg_iou") if k in result]
  return ", ".join(parts)


if __name__ == "__main__":
  run_with_help_exit_zero(lambda: errors.run_main(main))

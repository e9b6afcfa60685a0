r"""Segment a dataset split with the multilevel clustering method, data-parallel over every local device.

  python -m experiments.segment --config=configs/demo.py --workdir=/tmp/jaxseg_demo

Several hosts: start the same command on every host with a shared --workdir and
--config.distributed.coordinator_address=HOST0:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I (or under Slurm / Open MPI, which JAX detects).
"""

import pathlib
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import distributed
from experiments import pipeline
from experiments.common import config_fields
from jaxseg import models

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Path to an ml_collections config file (configs/*.py). Override any field with "
    "--config.FIELD=VALUE; the fields are: " + ", ".join(config_fields(_DEFAULT_CONFIG)), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for features, predictions, metrics and the gallery.")
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir", "~/.cache/jaxseg/xla", "Persistent XLA compilation cache (empty: none). The CRF compiles once "
    "per image size, so a rerun or a resumed run skips most compilation.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  distributed.initialize(_CONFIG.value.distributed)  # before any JAX computation
  if _XLA_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(_XLA_CACHE.value).expanduser()))
  logging.info("workdir: %s", _WORKDIR.value)
  logging.info("config:\n%s", _CONFIG.value)
  try:
    result = pipeline.run(_CONFIG.value, _WORKDIR.value)
  except models.WeightsUnavailableError as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  summary = {k: result[k] for k in ("num_images", "miou", "pixel_accuracy", "fg_iou") if k in result}
  logging.info("done: %s; see %s/metrics.json and gallery.html", summary, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

r"""Measure which backbone, block and feature separates foreground from background (DINO vs DINOv2).

  python -m experiments.analyze_features --config=configs/analyze_voc.py --workdir=/tmp/jaxseg_analyze_voc
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import analysis
from experiments.common import config_fields
from jaxseg import models

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "analyze_voc.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Path to an ml_collections config file (configs/analyze_*.py). Override any "
    "field with --config.FIELD=VALUE; the fields are: " + ", ".join(config_fields(_DEFAULT_CONFIG)), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for analysis.csv, analysis.md, figures/ and the "
                               "per-backbone results a restart reuses.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.info("workdir: %s", _WORKDIR.value)
  logging.info("config:\n%s", _CONFIG.value)
  try:
    rows = analysis.run(_CONFIG.value, _WORKDIR.value)
  except models.WeightsUnavailableError as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  logging.info("done: %d rows; see %s/analysis.md and figures/", len(rows), _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

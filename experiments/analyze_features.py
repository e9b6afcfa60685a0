r"""Measure which backbone, block and feature separates foreground from background (DINO vs DINOv2).

  python -m experiments.analyze_features --config=configs/analyze_voc.py --workdir=/tmp/jaxseg_analyze_voc

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

from experiments import analysis
from experiments import errors
from experiments import validation
from experiments.common import load_config_file

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "analyze_voc.py"
_CONFIG = errors.define_config_file(
    str(_DEFAULT_CONFIG), "Path to an ml_collections config file (configs/analyze_*.py). Override any "
    f"field with --config.FIELD=VALUE; the fields, with {_DEFAULT_CONFIG.name}'s values:\n"
    + validation.field_help(load_config_file(_DEFAULT_CONFIG)))
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for analysis.csv, analysis.md, figures/ and the "
                               "per-backbone results a restart reuses.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  validation.validate(_CONFIG.value, _WORKDIR.value)
  logging.info("workdir: %s", _WORKDIR.value)
  logging.info("config:\n%s", _CONFIG.value)
  rows = analysis.run(_CONFIG.value, _WORKDIR.value)  # holds the workdir's lock while it runs
  logging.info("done: %d rows; see %s/analysis.md and figures/", len(rows), _WORKDIR.value)


if __name__ == "__main__":
  errors.run_main(main)

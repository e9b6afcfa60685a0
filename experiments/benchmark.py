r"""Benchmarks: jaxseg against the reference implementations, in one run.

  python -m experiments.benchmark --only=vit,kmeans

Each benchmark lives in experiments/benchmarks/<name>.py with a `run()` that
prints its rows (jaxseg, reference, ratio). Timings use wall clock after a
warm-up; the reference runs in the same process with the same thread count.
"""

import importlib

from absl import app
from absl import flags

BENCHMARKS = ("vit", "kmeans", "crf", "split", "data", "pipeline", "scale")

_ONLY = flags.DEFINE_list("only", list(BENCHMARKS), f"Which benchmarks to run, from {BENCHMARKS}.")


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(BENCHMARKS))
  if unknown:
    raise app.UsageError(f"Unknown benchmark(s) {unknown}; choose from {BENCHMARKS}.")
  for name in _ONLY.value:
    print(f"== {name}", flush=True)
    importlib.import_module(f"experiments.benchmarks.{name}").run()


if __name__ == "__main__":
  app.run(main)

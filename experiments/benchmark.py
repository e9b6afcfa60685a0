r"""Benchmarks: jaxseg against the reference implementations, in one run.

  python -m experiments.benchmark --only=vit,kmeans

Each benchmark lives in experiments/benchmarks/<name>.py with a `run()` that
prints its rows (jaxseg, reference, ratio). Timings use wall clock after a
warm-up; the reference runs in the same process with the same thread count (and the same
malloc: experiments/hugepages.py).
"""

if __name__ == "__main__":  # before the imports below: glibc reads its malloc tunables only at process start
  from experiments import hugepages
  hugepages.reexec_with_huge_pages()

import importlib

from absl import app
from absl import flags

from experiments import errors

BENCHMARKS = ("vit", "kmeans", "crf", "split", "data", "pipeline", "scale", "gpu")
# Run by default: "gpu" is the accelerator check, asked for by name (--only=gpu).
DEFAULT = BENCHMARKS[:-1]

_ONLY = flags.DEFINE_list("only", list(DEFAULT), f"Which benchmarks to run, from {BENCHMARKS}.")


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(BENCHMARKS))
  if unknown:
    raise app.UsageError(f"Unknown benchmark(s) {unknown}; choose from {BENCHMARKS}.")
  # The reference implementations compared against: module -> pip package (in the test extra).
  references = {"torch": "torch", "transformers": "transformers", "sklearn": "scikit-learn",
                "pydensecrf": "pydensecrf2", "psutil": "psutil"}
  for name in _ONLY.value:
    print(f"== {name}", flush=True)
    try:
      importlib.import_module(f"experiments.benchmarks.{name}").run()
    except ModuleNotFoundError as e:
      missing = (e.name or "").split(".")[0]
      if missing not in references:
        raise
      raise errors.UserError(f"benchmark {name!r} compares against {references[missing]}, which is not installed; "
                             "install the test extra: pip install -e '.[test]'") from e


if __name__ == "__main__":
  errors.run_main(main)

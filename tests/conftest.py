"""Test setup: JAX on CPU, deterministic seeds, and a home of the suite's own.

HOME, JAXSEG_CACHE and XDG_CACHE_HOME point into a temporary directory before any test module is
imported (test modules copy os.environ into their subprocesses' env at import), so the weights cache,
the demo's data and the binaries' default XLA cache (~/.cache/jaxseg/xla) of every test, subprocesses
included, land there and not in the user's home (which would also turn later "cold" timings warm).
At the end, the session fails if the real ~/.cache/jaxseg changed.
"""

import os
import pathlib
import shutil
import tempfile

REAL_HOME = pathlib.Path(os.path.expanduser("~")).resolve()
SUITE_HOME = pathlib.Path(tempfile.mkdtemp(prefix="jaxseg-tests-home-")).resolve()

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["HOME"] = str(SUITE_HOME)
os.environ["JAXSEG_CACHE"] = str(SUITE_HOME / ".cache" / "jaxseg")
os.environ["XDG_CACHE_HOME"] = str(SUITE_HOME / ".cache")
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # a user's own jax cache setting would be written to

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def home_state(home: pathlib.Path) -> dict[str, tuple[int, int]]:
  """{path: (size, mtime_ns)} of every file under home/.cache/jaxseg: what a leak from the suite would change."""
  root = home / ".cache" / "jaxseg"
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


_REAL_STATE_AT_START = home_state(REAL_HOME)


@pytest.fixture
def real_home() -> pathlib.Path:
  """The user's home as it was before this conftest replaced HOME."""
  return REAL_HOME


def pytest_sessionfinish(session, exitstatus):
  shutil.rmtree(SUITE_HOME, ignore_errors=True)
  if home_state(REAL_HOME) != _REAL_STATE_AT_START:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    print(f"\nerror: the test suite wrote into {REAL_HOME / '.cache' / 'jaxseg'} (it must use its temporary home)")


@pytest.fixture(autouse=True)
def _seed():
  np.random.seed(0)
  try:
    import torch
    torch.manual_seed(0)
  except ImportError:
    pass

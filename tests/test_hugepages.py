"""The binaries re-execute themselves once with glibc's huge-page malloc tunable (experiments/hugepages.py)."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import hugepages

ROOT = pathlib.Path(__file__).resolve().parents[1]
BINARIES = ("segment", "analyze_features", "benchmark")


def test_tunables_env_appends_the_tunable_to_glibc_tunables():
  glibc = (2, 36)
  assert hugepages.tunables_env({"A": "1"}, glibc) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert hugepages.tunables_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ,glibc", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36)),  # the user's own choice stands
    ({"JAXSEG_HUGE_PAGES": "0"}, (2, 36)),  # opted out
    ({}, (2, 34)),  # a glibc without the tunable
    ({}, None),  # no glibc (macOS, musl)
])
def test_tunables_env_leaves_the_process_alone(environ, glibc):
  assert hugepages.tunables_env(environ, glibc) is None


_SCRIPT = """
import os, sys
print("start", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
sys.path.insert(0, {root!r})
from experiments import hugepages
hugepages.reexec_with_huge_pages()
print("after", os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:])
"""


@pytest.mark.skipif(hugepages.tunables_env({}, hugepages._glibc_version()) is None,
                    reason="needs glibc >= 2.35")
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_runs_the_same_command_again_with_the_tunable(tmp_path, opt_out):
  script = tmp_path / "script.py"
  script.write_text(_SCRIPT.format(root=str(ROOT)))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXSEG_HUGE_PAGES")}
  if opt_out:
    env["JAXSEG_HUGE_PAGES"] = "0"
  done = subprocess.run([sys.executable, "-u", str(script), "x", "--flag=1"], env=env, capture_output=True,
                        text=True, timeout=60, check=True)
  if opt_out:
    assert done.stdout.splitlines() == ["start -", "after - ['x', '--flag=1']"]
  else:
    assert done.stdout.splitlines() == ["start -", "start glibc.malloc.hugetlb=1",
                                        "after glibc.malloc.hugetlb=1 ['x', '--flag=1']"]


@pytest.mark.parametrize("binary", BINARIES)
def test_binaries_reexec_before_their_first_import(binary):
  body = ast.parse((ROOT / "experiments" / f"{binary}.py").read_text()).body
  first = body[1]  # after the docstring
  assert isinstance(first, ast.If) and ast.unparse(first.test) == "__name__ == '__main__'"
  assert "hugepages.reexec_with_huge_pages()" in [ast.unparse(statement) for statement in first.body]

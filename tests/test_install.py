"""The documented install works as documented: the core package alone (no test extra) keeps XLA programs.

jax writes no program to its persistent cache when `filelock` is missing (it only warns), and the test
extra pulls filelock in through torch, so only a scratch environment with the core package shows it.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_core_install_runs_the_offline_demo_and_fills_the_xla_cache(tmp_path):
  source = tmp_path / "src"  # a copy: pip builds in the source tree (build/, *.egg-info)
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "build", "*.egg-info",
                                                              "__pycache__", ".pytest_cache"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  install = subprocess.run([python, "-m", "pip", "install", "-q", str(source)], env=env, capture_output=True,
                           text=True, timeout=1500)
  assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
  probe = subprocess.run([python, "-c", "import importlib.util as u, jaxseg; print(jaxseg.__file__); "
                          "print([m for m in ('torch', 'sklearn', 'pydensecrf', 'pytest') if u.find_spec(m)])"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert probe.returncode == 0, probe.stderr
  installed, extras = probe.stdout.splitlines()
  assert str(venv) in installed and extras == "[]", probe.stdout  # the core package, without the test extra

  home = tmp_path / "home"
  workdir = tmp_path / "demo"
  demo = subprocess.run([python, "-m", "experiments.segment", f"--config={ROOT / 'configs' / 'demo.py'}",
                         f"--workdir={workdir}", "--config.model.weights=random", "--config.image_size=56",
                         "--config.crf.iterations=2"],
                        cwd=tmp_path, env=dict(env, HOME=str(home), JAXSEG_CACHE=str(home / "jaxseg")),
                        capture_output=True, text=True, timeout=900)
  assert demo.returncode == 0, demo.stderr[-4000:]
  assert (workdir / "metrics.json").is_file()
  assert "filelock" not in demo.stderr, demo.stderr[-3000:]
  programs = list((home / ".cache" / "jaxseg" / "xla").glob("*-cache"))
  assert programs, f"the XLA cache holds no program:\n{demo.stderr[-3000:]}"

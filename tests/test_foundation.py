"""The package imports, the binaries parse their flags, configs load."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from jaxseg.framework.config import FUSIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["jaxseg.models", "jaxseg.cluster", "jaxseg.crf", "jaxseg.metrics",
                                    "jaxseg.data", "jaxseg.framework", "jaxseg.viz"])
def test_import(module):
  importlib.import_module(module)


def test_segment_helpfull_lists_config_flags():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "experiments.segment", "--helpfull"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  text = out.stdout + out.stderr  # absl exits 1 after printing help
  assert "--config" in text and "--workdir" in text, text
  assert "model.variant" in text and "data.name" in text, text
  # Each field with demo.py's value and, where restricted, what it accepts.
  assert f"method.fusion='vote' (one of {', '.join(FUSIONS)})" in text, text
  assert "crf.bilateral_srgb=3.0 (> 0)" in text and "batch_size=4 (>= 1)" in text, text


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[a-z]*.py")), ids=lambda p: p.name)
def test_config_docstring_gives_command(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert "python -m experiments." in module.__doc__
  assert f"configs/{path.name}" in module.__doc__
  assert config.to_dict()

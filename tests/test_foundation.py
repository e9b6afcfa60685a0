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
  text = out.stdout + out.stderr
  assert out.returncode == 0, text  # segment turns absl's status 1 after help into 0
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


def test_segment_help_shows_the_config_fields():
  out = subprocess.run([sys.executable, "-m", "experiments.segment", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text  # help asked for is a success, not absl's status 1
  assert "--config: Path to an ml_collections config file" in text, text
  assert text.index("--config:") < text.index("model.variant='dinov2_vits14'") < text.index("--workdir:"), text


def test_no_libtpu_line_without_tpus(tmp_path):
  # absl logging as in the binaries, and JAX left to probe every platform as a user's run does
  script = ("from absl import app\nimport experiments.errors\n"
            "def main(_):\n  import jax\n  print(jax.devices())\napp.run(main)\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "CpuDevice" in out.stdout, out.stderr
  assert "libtpu" not in out.stdout + out.stderr and "backend 'tpu'" not in out.stderr, out.stderr


def test_suite_and_its_subprocesses_use_a_temporary_home(real_home):
  """conftest.py's home: the weights cache and the binaries' default XLA cache land there, not in the user's."""
  home = pathlib.Path(os.environ["HOME"]).resolve()
  assert home != real_home and not home.is_relative_to(real_home), home
  script = ("import jax, pathlib\nfrom experiments import common\nfrom jaxseg.models import pretrained\n"
            "common.use_xla_cache('~/.cache/jaxseg/xla', 16)\n"
            "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            "jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(7)).block_until_ready()\n"
            "print(pathlib.Path.home(), pretrained.default_cache_dir(), sep='\\n')\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stderr
  child_home, weights_cache = (pathlib.Path(line).resolve() for line in out.stdout.split())
  assert child_home == home and weights_cache.is_relative_to(home), out.stdout
  assert any((home / ".cache" / "jaxseg" / "xla").glob("*-cache")), "the program went to another XLA cache"


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_as_a_smoke_test():
  out = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--only=gpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "no accelerator: a smoke run" in out.stdout, out.stdout
  for check in ("vit parity", "vit throughput, bfloat16", "dense_crf 500x375", "dense_crf 512x512", "split, 4 images"):
    assert check in out.stdout, out.stdout
  assert "MISMATCH" not in out.stdout, out.stdout

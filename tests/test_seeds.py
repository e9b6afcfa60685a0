"""config.seeds: the features once, every seed-dependent pass once per seed under workdir/seeds/<s>/.

Every run here reads one local weights file, so config.seed (which initialises random weights) changes
only the seeded passes, and seed s of a multi-seed run can be compared with a plain run with seed = s.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import fixtures
from experiments import runner
from experiments import validation
from experiments.errors import UserError
from jaxseg import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "voc_dinov2_vits14.py"
PER_SEED = ("dataset_level", "category_level", "image_level", "refinement", "descriptors", "classes", "predictions",
            "report")
SCORES = ("miou", "pixel_accuracy", "fg_iou", "fg_iou_levels", "per_class_iou", "per_image_matching", "num_images",
          "fg_fraction", "effective", "assignment")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("seeds")
  fixtures.make_voc_devkit(root / "manual", n_train=1, n_val=4)
  vit = models.get_variant("dinov2_vits14")
  weights = root / "weights.safetensors"
  with pytest.warns(UserWarning, match="randomly initialised"):
    params, _ = models.load_params("random", "dinov2_vits14", seed=7)
  models.save_params(weights, params, vit)
  overrides = {**fixtures.SMALL_SEGMENT, "data.data_dir": str(root / "tfds"), "data.manual_dir": str(root / "manual"),
               "model.weights": str(weights)}
  root.joinpath("flags").write_text("\n".join(f"--config.{k}={v}" for k, v in overrides.items()))
  return root, lambda **changes: fixtures.segment_config(CONFIG, **{**overrides, **changes})


@pytest.fixture(scope="module")
def seeded_run(setup):
  root, config = setup
  workdir = root / "seeded"
  runner.run(config(seed=0, seeds=(1, 2)), workdir)
  return workdir


def _metrics(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "metrics.json").read_text())


@pytest.mark.slow
def test_each_seed_equals_a_run_with_that_seed(setup, seeded_run):
  root, config = setup
  single = root / "single"
  runner.run(config(seed=2), single)
  fixtures.assert_same_segmentation(seeded_run / "seeds" / "2", single, SCORES)
  assert _metrics(seeded_run / "seeds" / "2")["seed"] == 2
  # A plain run keeps today's layout: no seeds/ folder, no summary.
  assert not (single / "seeds").exists() and "seeds" not in _metrics(single)
  # The features are computed once, in the workdir; no seed has its own.
  assert sorted(p.name for p in (seeded_run / "seeds").iterdir()) == ["1", "2"]
  for seed in ("1", "2"):
    assert not (seeded_run / "seeds" / seed / "features").exists()
    assert fixtures.passes_run(seeded_run / "seeds" / seed) == set(PER_SEED)
  assert fixtures.passes_run(seeded_run) == {"features"}
  # The seeds differ where the sampling keys matter (sample_budget < the patches).
  centroids = []
  for seed in ("1", "2"):
    with np.load(seeded_run / "seeds" / seed / "levels" / "dataset.npz") as level:
      centroids.append(level["centroids"])
  assert not np.allclose(*centroids)


def test_summary_is_the_mean_and_sample_std_of_the_seeds(seeded_run):
  summary = _metrics(seeded_run)["seeds"]
  assert summary["values"] == [1, 2]
  per_seed = [_metrics(seeded_run / "seeds" / s) for s in ("1", "2")]
  for name in ("miou", "pixel_accuracy", "fg_iou"):
    values = [m[name] for m in per_seed]
    assert summary["mean"][name] == pytest.approx(np.mean(values), abs=1e-12), name
    assert summary["std"][name] == pytest.approx(np.std(values, ddof=1), abs=1e-12), name
  assert set(summary["mean"]["fg_iou_levels"]) == {"dataset", "category", "image", "fused", "refined"}
  assert set(summary["mean"]["per_image_matching"]) == {"miou", "pixel_accuracy"}
  for group in ("fg_iou_levels", "per_image_matching"):
    for name in summary["mean"][group]:
      values = [m[group][name] for m in per_seed]
      assert summary["mean"][group][name] == pytest.approx(np.mean(values), abs=1e-12), (group, name)
      assert summary["std"][group][name] == pytest.approx(np.std(values, ddof=1), abs=1e-12), (group, name)


@pytest.mark.slow
def test_adding_a_seed_runs_only_that_seed(setup, seeded_run, tmp_path):
  _, config = setup
  workdir = tmp_path / "more"
  shutil.copytree(seeded_run, workdir)
  runner.run(config(seed=0, seeds=(1, 2, 3)), workdir)
  assert fixtures.passes_run(workdir) == set()  # the features are reused
  assert fixtures.passes_run(workdir / "seeds" / "3") == set(PER_SEED)
  for seed in ("1", "2"):
    assert fixtures.passes_run(workdir / "seeds" / seed) == {"report"}
    fixtures.assert_same_segmentation(workdir / "seeds" / seed, seeded_run / "seeds" / seed, SCORES)
  assert _metrics(workdir)["seeds"]["values"] == [1, 2, 3]


def test_repeated_or_non_integer_seeds_are_refused_before_any_work(setup, tmp_path):
  _, config = setup
  for seeds in ((1, 1), (0.5,)):
    with pytest.raises(UserError, match=r"config\.seeds=.* must be distinct integers"):
      validation.validate(config(seeds=seeds), tmp_path / "work")
  validation.validate(config(seeds=(3, 1)), tmp_path / "work")


@pytest.mark.slow
def test_killed_in_a_seeds_pass_resumes_to_the_same_outputs(setup, seeded_run, tmp_path):
  """Killed right after seed 1's refinement (the hook fires at the first seed's pass), then run again."""
  root, _ = setup
  workdir = tmp_path / "killed"
  command = [sys.executable, "-m", "experiments.segment", f"--workdir={workdir}", f"--config={CONFIG}",
             *root.joinpath("flags").read_text().split("\n"), "--config.seed=0", "--config.seeds=1,2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(command, cwd=ROOT, env=dict(env, JAXSEG_TEST_KILL_AFTER="refinement"), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert not (workdir / "seeds" / "2").exists() and not (workdir / "metrics.json").exists()
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert fixtures.passes_run(workdir / "seeds" / "1") == {"descriptors", "classes", "predictions", "report"}
  for seed in ("1", "2"):
    fixtures.assert_same_segmentation(workdir / "seeds" / seed, seeded_run / "seeds" / seed, SCORES)
  assert _metrics(workdir)["seeds"] == _metrics(seeded_run)["seeds"]

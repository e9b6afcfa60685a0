"""The segment binary end to end: a tiny VOC-layout fixture, random weights, resume after a kill.

Scores are recomputed here from the written PNGs and the fixture's own mask
files with numpy and scipy, independently of jaxseg.metrics and jaxseg.data.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import scipy.optimize

import fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
NUM_CLASSES = 3
SMALL = ["--config.model.weights=random", "--config.image_size=56", "--config.batch_size=2",
         f"--config.method.num_classes={NUM_CLASSES}", "--config.method.num_categories=2",
         "--config.crf.iterations=5", "--config.gallery_size=4"]


def _command(workdir, *flags):
  return [sys.executable, "-m", "experiments.segment", f"--workdir={workdir}", *flags]


def _run(workdir, *flags, timeout=600):
  out = subprocess.run(_command(workdir, *flags), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def _pngs(folder: pathlib.Path) -> dict[str, np.ndarray]:
  return {str(p.relative_to(folder)): np.array(PIL.Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  ids = fixtures.make_voc_devkit(root / "manual", n_train=1, n_val=5)
  flags = ["--config=configs/voc_dinov2_vits14.py", f"--config.data.data_dir={root / 'tfds'}",
           f"--config.data.manual_dir={root / 'manual'}", *SMALL]
  return root, ids, flags


@pytest.fixture(scope="module")
def clean_run(voc, tmp_path_factory):
  _, _, flags = voc
  workdir = tmp_path_factory.mktemp("clean")
  _run(workdir, *flags)
  return workdir


@pytest.mark.slow
def test_outputs_and_metrics_match_recomputation(voc, clean_run):
  root, ids, _ = voc
  metrics = json.loads((clean_run / "metrics.json").read_text())
  predictions = _pngs(clean_run / "predictions")
  assert sorted(predictions) == sorted(f"{i}.png" for i in ids["val"])
  assert metrics["num_images"] == len(ids["val"])
  assert (clean_run / "gallery.html").exists()

  seg = root / "manual" / "VOCdevkit" / "VOC2012" / "SegmentationClass"
  cm = np.zeros((NUM_CLASSES + 1, 21), np.int64)
  inter = union = 0
  for image_id in ids["val"]:
    gt = np.array(PIL.Image.open(seg / f"{image_id}.png"))
    pred = predictions[f"{image_id}.png"]
    assert pred.shape == gt.shape and pred.max() <= NUM_CLASSES
    counted = gt != 255
    np.add.at(cm, (pred[counted], gt[counted]), 1)
    mask = np.array(PIL.Image.open(clean_run / "masks" / f"{image_id}.png")).astype(bool)
    assert np.array_equal(mask, pred > 0)
    inter += np.sum(mask & (gt > 0) & counted)
    union += np.sum((mask | (gt > 0)) & counted)
  rows, cols = scipy.optimize.linear_sum_assignment(cm, maximize=True)
  present = cm.sum(0) > 0
  iou = np.zeros(21)
  for r, c in zip(rows, cols):
    iou[c] = cm[r, c] / (cm[r].sum() + cm[:, c].sum() - cm[r, c])
  assert metrics["miou"] == pytest.approx(iou[present].mean(), abs=1e-9)
  assert metrics["pixel_accuracy"] == pytest.approx(cm[rows, cols].sum() / cm.sum(), abs=1e-9)
  assert metrics["fg_iou"] == pytest.approx(inter / union, abs=1e-9)
  assert set(metrics["fg_iou_levels"]) == {"dataset", "category", "image", "fused", "refined"}
  assert set(metrics["seconds"]) >= {"features", "dataset_level", "category_level", "refinement", "labeling"}


@pytest.mark.slow
def test_killed_and_restarted_gives_same_outputs(voc, clean_run, tmp_path):
  _, _, flags = voc
  workdir = tmp_path / "resumed"
  process = subprocess.Popen(_command(workdir, *flags), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not list((workdir / "masks").glob("*.png")) and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, "the run finished before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (workdir / "metrics.json").exists()
  _run(workdir, *flags)
  assert _pngs(workdir / "predictions").keys() == _pngs(clean_run / "predictions").keys()
  for name, pred in _pngs(workdir / "predictions").items():
    np.testing.assert_array_equal(pred, _pngs(clean_run / "predictions")[name], err_msg=name)
  resumed, clean = (json.loads((w / "metrics.json").read_text()) for w in (workdir, clean_run))
  for key in ("miou", "pixel_accuracy", "fg_iou", "fg_iou_levels", "per_class_iou", "num_images"):
    assert resumed[key] == clean[key], key


def test_rerun_with_other_config_is_refused(voc, clean_run):
  _, _, flags = voc
  out = subprocess.run(_command(clean_run, *flags, "--config.method.fusion=mean"), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert "different config" in out.stderr and "method" in out.stderr


def _awkward_folder(root: pathlib.Path) -> dict[str, tuple[int, int]]:
  rng = np.random.default_rng(0)
  images = {
      "gray.png": PIL.Image.fromarray(rng.integers(0, 255, (40, 50), np.uint8), "L"),
      "rgba.png": PIL.Image.fromarray(rng.integers(0, 255, (30, 60, 4), np.uint8), "RGBA"),
      "deep16.png": PIL.Image.fromarray(rng.integers(0, 65535, (45, 35), np.uint16)),
      "tiny.png": PIL.Image.fromarray(np.full((1, 1, 3), 200, np.uint8)),
      "large.jpg": PIL.Image.fromarray(np.kron(rng.integers(0, 255, (30, 40, 3), np.uint8),
                                               np.ones((100, 100, 1), np.uint8))),
  }
  sizes = {}
  for name, image in images.items():
    image.save(root / name)
    sizes[name.rsplit(".", 1)[0]] = (image.height, image.width)
  return sizes


@pytest.mark.slow
def test_folder_of_awkward_images(tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  sizes = _awkward_folder(folder)
  workdir = tmp_path / "work"
  _run(workdir, "--config=configs/demo.py", f"--config.data.name=folder:{folder}", *SMALL,
       "--config.method.num_classes=2")
  predictions = _pngs(workdir / "predictions")
  assert {name[:-4]: p.shape for name, p in predictions.items()} == sizes
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert "miou" not in metrics and metrics["num_images"] == len(sizes)
  assert 0.0 <= metrics["fg_fraction"]["refined"] <= 1.0


def test_missing_weights_offline_gives_one_clear_message(voc, tmp_path):
  _, _, flags = voc
  workdir = tmp_path / "work"
  env = dict(ENV, JAXSEG_CACHE=str(tmp_path / "cache"))
  flags = [f for f in flags if not f.startswith("--config.model.weights")] + ["--config.model.weights=hf"]
  out = subprocess.run(_command(workdir, *flags), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert "huggingface.co" in out.stderr and str(tmp_path / "cache") in out.stderr
  assert "Traceback" not in out.stderr
  assert not workdir.exists() or not any(workdir.iterdir())

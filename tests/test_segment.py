"""The segment runner end to end on a tiny VOC-layout fixture with random weights: outputs, resume after a
kill at every pass boundary, reruns after config changes, and agreement with the in-memory API.

Scores are recomputed here from the written PNGs and the fixture's own mask files with numpy and scipy,
independently of jaxseg.metrics and jaxseg.data. Runs in this process (experiments.runner.run) share
compiled programs; the kill tests run the binary, whose outputs must equal the in-process ones.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import PIL.Image
import pytest
import scipy.optimize

import fixtures
from experiments import runner
from experiments import workdir_lock
from experiments.errors import UserError
from jaxseg import framework

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
NUM_CLASSES = 3
SMALL = {**fixtures.SMALL_SEGMENT, "method.num_classes": NUM_CLASSES}
PASSES = ("features", "dataset_level", "category_level", "image_level", "refinement", "descriptors", "classes",
          "predictions", "report")
SCORES = ("miou", "pixel_accuracy", "fg_iou", "fg_iou_levels", "per_class_iou", "num_images", "fg_fraction",
          "effective", "assignment")


def _command(workdir, *flags):
  return [sys.executable, "-m", "experiments.segment", f"--workdir={workdir}", *flags]


def _run(workdir, *flags, timeout=600):
  out = subprocess.run(_command(workdir, *flags), cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out






def _metrics(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "metrics.json").read_text())




@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  ids = fixtures.make_voc_devkit(root / "manual", n_train=1, n_val=5)
  data = {"data.data_dir": str(root / "tfds"), "data.manual_dir": str(root / "manual")}
  flags = ["--config=configs/voc_dinov2_vits14.py", *(f"--config.{k}={v}" for k, v in {**data, **SMALL}.items())]
  return root, ids, data, flags


def _config(voc, **changes):
  _, _, data, _ = voc
  return fixtures.segment_config(ROOT / "configs" / "voc_dinov2_vits14.py", **{**data, **SMALL, **changes})


@pytest.fixture(scope="module")
def clean_run(voc, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("clean")
  runner.run(_config(voc), workdir)
  return workdir


def _check_metrics_against_recomputation(workdir: pathlib.Path, root: pathlib.Path, ids: list[str],
                                         num_classes: int = NUM_CLASSES) -> None:
  metrics = _metrics(workdir)
  predictions = fixtures.read_pngs(workdir / "predictions")
  assert sorted(predictions) == sorted(f"{i}.png" for i in ids)
  assert metrics["num_images"] == len(ids)
  seg = root / "manual" / "VOCdevkit" / "VOC2012" / "SegmentationClass"
  cm = np.zeros((num_classes + 1, 21), np.int64)
  matched = np.zeros((21, 21), np.int64)  # the per-image protocol: rows = the class each image matched a cluster to
  inter = union = 0
  for image_id in ids:
    gt = np.array(PIL.Image.open(seg / f"{image_id}.png"))
    pred = predictions[f"{image_id}.png"]
    assert pred.shape == gt.shape and pred.max() <= num_classes
    counted = gt != 255
    image_cm = np.zeros_like(cm)
    np.add.at(image_cm, (pred[counted], gt[counted]), 1)
    cm += image_cm
    for r, c in zip(*scipy.optimize.linear_sum_assignment(image_cm, maximize=True)):
      matched[c] += image_cm[r]
    mask = np.array(PIL.Image.open(workdir / "masks" / f"{image_id}.png")).astype(bool)
    assert np.array_equal(mask, pred > 0)
    inter += np.sum(mask & (gt > 0) & counted)
    union += np.sum((mask | (gt > 0)) & counted)
  rows, cols = scipy.optimize.linear_sum_assignment(cm, maximize=True)
  present = cm.sum(0) > 0
  iou = np.zeros(21)
  for r, c in zip(rows, cols):
    iou[c] = cm[r, c] / max(cm[r].sum() + cm[:, c].sum() - cm[r, c], 1)
  assert metrics["miou"] == pytest.approx(iou[present].mean(), abs=1e-9)
  assert metrics["pixel_accuracy"] == pytest.approx(cm[rows, cols].sum() / cm.sum(), abs=1e-9)
  assert metrics["fg_iou"] == pytest.approx(inter / union, abs=1e-9)
  per_image = metrics["per_image_matching"]
  per_image_iou = np.diag(matched) / np.maximum(cm.sum(0) + matched.sum(1) - np.diag(matched), 1)
  assert per_image["miou"] == pytest.approx(per_image_iou[present].mean(), abs=1e-9)
  assert per_image["pixel_accuracy"] == pytest.approx(np.trace(matched) / cm.sum(), abs=1e-9)
  assert per_image["per_class_iou"] == pytest.approx(
      {name: per_image_iou[c] for c, name in enumerate(fixtures.VOC_CLASSES) if present[c]}, abs=1e-9)
  assert "inside each image" in per_image["note"] and "not the dataset-level mIoU" in per_image["note"]


@pytest.mark.slow
def test_outputs_and_metrics_match_recomputation(voc, clean_run):
  root, ids, _, _ = voc
  _check_metrics_against_recomputation(clean_run, root, ids["val"])
  metrics = _metrics(clean_run)
  assert (clean_run / "gallery.html").exists()
  assert set(metrics["fg_iou_levels"]) == {"dataset", "category", "image", "fused", "refined"}
  assert set(metrics["seconds"]) == set(PASSES) - {"report"}
  assert metrics["effective"] == {"num_categories": 2, "num_classes": NUM_CLASSES}


@pytest.mark.slow
def test_in_memory_api_gives_the_runners_levels_and_masks(voc, clean_run):
  """framework.segment_features on the runner's cached features, with its seed and batch size."""
  root, ids, _, _ = voc
  config = _config(voc)
  method = runner.method_config(config)
  features, cached_ids = runner.feature_cache(clean_run)
  result = framework.segment_features(features, method, key=jax.random.key(config.seed), batch_size=config.batch_size)
  levels = clean_run / "levels"
  with np.load(levels / "dataset.npz") as dataset, np.load(levels / "category.npz") as category:
    np.testing.assert_array_equal(dataset["foreground"], result.dataset.foreground)
    np.testing.assert_allclose(dataset["centroids"], result.dataset.centroids, atol=1e-6)
    np.testing.assert_allclose(dataset["prototypes"], result.dataset.prototypes, atol=1e-6)
    np.testing.assert_allclose(category["centroids"], result.category_centroids, atol=1e-6)
    np.testing.assert_allclose(category["prototypes"], result.category_prototypes, atol=1e-6)
  margins = [np.load(path) for path in sorted((clean_run / "margins").glob("*.npz"))]
  fg_prob = np.concatenate([m["fg_prob"] for m in margins])[:len(ids["val"])]
  np.testing.assert_allclose(fg_prob, result.fg_prob, atol=1e-6)
  images = root / "manual" / "VOCdevkit" / "VOC2012" / "JPEGImages"
  for position, image_id in enumerate(cached_ids):
    image = np.array(PIL.Image.open(images / f"{image_id}.jpg").convert("RGB"))
    mask = np.asarray(framework.refine(image, result.fg_prob[position], method.crf))
    np.testing.assert_array_equal(mask, np.array(PIL.Image.open(clean_run / "masks" / f"{image_id}.png")) > 0,
                                  err_msg=image_id)


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    ({"method.num_classes": 2}, {"classes", "predictions"}),
    ({"method.fusion": "intersection"}, {"image_level", "refinement", "descriptors", "classes", "predictions"}),
    ({"crf.iterations": 2}, {"refinement", "descriptors", "classes", "predictions"}),
], ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_changed_config_reruns_only_what_depends_on_it(voc, clean_run, tmp_path, change, expected):
  root, ids, _, _ = voc
  workdir = tmp_path / "changed"
  shutil.copytree(clean_run, workdir)
  features_before = {p.name: p.stat().st_mtime_ns for p in (workdir / "features").iterdir()}
  runner.run(_config(voc, **change), workdir)
  assert fixtures.passes_run(workdir) == expected | {"report"}
  assert {p.name: p.stat().st_mtime_ns for p in (workdir / "features").iterdir()} == features_before
  fresh = tmp_path / "fresh"
  runner.run(_config(voc, **change), fresh)
  fixtures.assert_same_segmentation(workdir, fresh, SCORES)
  _check_metrics_against_recomputation(workdir, root, ids["val"], change.get("method.num_classes", NUM_CLASSES))


def test_a_location_presentation_or_packing_change_reuses_everything(voc, clean_run, tmp_path):
  workdir = tmp_path / "moved"
  shutil.copytree(clean_run, workdir)
  runner.run(_config(voc, gallery_size=2, **{"model.cache_dir": str(tmp_path / "elsewhere"),
                                             "data.manual_dir": str(tmp_path), "crf.canvas_pixels": 1 << 16}),
             workdir)
  assert fixtures.passes_run(workdir) == {"report"}
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)


def test_outputs_deleted_by_hand_are_remade(voc, clean_run, tmp_path):
  """As the old error message advised: delete the classes and descriptors (and a prediction) to relabel."""
  workdir = tmp_path / "deleted"
  shutil.copytree(clean_run, workdir)
  shutil.rmtree(workdir / "descriptors")
  (workdir / "levels" / "classes.npz").unlink()
  next((workdir / "predictions").glob("*.png")).unlink()
  runner.run(_config(voc), workdir)
  assert fixtures.passes_run(workdir) == {"descriptors", "classes", "predictions", "report"}
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)


def _rewrite_voc(voc, root: pathlib.Path, folder: str, edit) -> dict:
  """A copy of the VOC fixture's manual dir under root whose files in `folder` (SegmentationClass or JPEGImages)
  are rewritten as edit(array) at the same size; returns the data config of a fresh data_dir for it."""
  source_root, *_ = voc
  manual = root / "manual"
  shutil.copytree(source_root / "manual", manual)
  for path in sorted((manual / "VOCdevkit" / "VOC2012" / folder).iterdir()):
    with PIL.Image.open(path) as image:
      palette = image.getpalette() if image.mode == "P" else None
      edited = PIL.Image.fromarray(edit(np.array(image)))
    if palette is not None:
      edited.putpalette(palette)
    edited.save(path)
  return {"data.data_dir": str(root / "tfds"), "data.manual_dir": str(manual)}


@pytest.mark.slow
def test_changed_labels_then_changed_images_equal_fresh_runs(voc, clean_run, tmp_path):
  """Same ids and sizes with other masks: the labels re-score (refinement counts against them), the features
  stay. Then other pixels in the images: the features of every image are recomputed. Each equals a fresh run.
  A data_dir prepared from a manual_dir whose files changed since is refused, naming how to rebuild."""
  workdir = tmp_path / "work"
  shutil.copytree(clean_run, workdir)
  features_before = {p.name: p.stat().st_mtime_ns for p in (workdir / "features").iterdir()}
  other_masks = _rewrite_voc(voc, tmp_path / "masks", "SegmentationClass",
                             lambda m: np.where(m == 255, 255, np.where(m > 0, 0, 1)).astype(np.uint8))
  runner.run(_config(voc, **other_masks), workdir)
  decisions = json.loads((workdir / "manifests" / "last_start.json").read_text())
  assert decisions["refinement"] == ["recompute", "labels changed: 5 changed"]
  assert fixtures.passes_run(workdir) == {"refinement", "descriptors", "classes", "predictions", "report"}
  assert {p.name: p.stat().st_mtime_ns for p in (workdir / "features").iterdir()} == features_before
  fresh = tmp_path / "fresh_masks"
  runner.run(_config(voc, **other_masks), fresh)
  fixtures.assert_same_segmentation(workdir, fresh, SCORES)
  assert _metrics(workdir)["fg_iou"] != _metrics(clean_run)["fg_iou"]

  other_images = _rewrite_voc(voc, tmp_path / "images", "JPEGImages", lambda image: 255 - image)
  runner.run(_config(voc, **other_images), workdir)
  decisions = json.loads((workdir / "manifests" / "last_start.json").read_text())
  assert decisions["features"] == ["recompute", "source changed: 5 changed"]
  assert fixtures.passes_run(workdir) == set(PASSES)
  fresh = tmp_path / "fresh_images"
  runner.run(_config(voc, **other_images), fresh)
  fixtures.assert_same_segmentation(workdir, fresh, SCORES)

  mask = next((tmp_path / "images" / "manual" / "VOCdevkit" / "VOC2012" / "SegmentationClass").iterdir())
  mask.write_bytes(mask.read_bytes() + b"\0")  # the archive changed after data_dir was prepared from it
  with pytest.raises(ValueError, match=rf"voc_seg at {tmp_path}/images/tfds/\S+ was prepared from other files "
                                       rf".*SegmentationClass/{mask.name}\): delete {tmp_path}/images/tfds/\S+ to "
                                       "prepare it again"):
    runner.run(_config(voc, **other_images), workdir)


def _edited_copy(root: pathlib.Path, path: str, old: str, new: str) -> pathlib.Path:
  """A copy of the code (jaxseg, experiments, configs) under root with `old` replaced by `new` in `path`."""
  for folder in ("jaxseg", "experiments", "configs"):
    shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
  source = (root / path).read_text()
  assert source.count(old) == 1, path
  (root / path).write_text(source.replace(old, new))
  return root


@pytest.mark.slow
def test_a_code_change_recomputes_what_it_touches(voc, clean_run, tmp_path):
  """The fusion rule edited in a copy of the package: a rerun on a finished workdir redoes the image level and
  everything after it, keeps the features, and equals a fresh run of the edited code."""
  *_, flags = voc
  code = _edited_copy(tmp_path / "code", "jaxseg/framework/fusion.py",
                      "return jnp.sort(scores, axis=0)[(scores.shape[0] - 1) // 2]", "return jnp.max(scores, axis=0)")
  env = dict(ENV, PYTHONPATH=str(code))
  run = lambda workdir: subprocess.run(_command(workdir, *flags), cwd=code, env=env, capture_output=True, text=True,
                                       timeout=600)
  workdir = tmp_path / "edited"
  shutil.copytree(clean_run, workdir)
  features_before = {p.name: p.stat().st_mtime_ns for p in (workdir / "features").iterdir()}
  out = run(workdir)
  assert out.returncode == 0, out.stderr[-4000:]
  decisions = json.loads((workdir / "manifests" / "last_start.json").read_text())
  assert fixtures.passes_run(workdir) == {"image_level", "refinement", "descriptors", "classes", "predictions",
                                          "report"}
  assert decisions["image_level"] == ["recompute", "code jaxseg/framework/fusion.py changed"]
  assert {p.name: p.stat().st_mtime_ns for p in (workdir / "features").iterdir()} == features_before
  fresh = tmp_path / "fresh"
  out = run(fresh)
  assert out.returncode == 0, out.stderr[-4000:]
  assert json.loads((fresh / "manifests" / "last_start.json").read_text())["features"] == [
      "compute", "no previous output"]
  fixtures.assert_same_segmentation(workdir, fresh, SCORES)
  fg_prob = lambda w: np.concatenate([np.load(p)["fg_prob"] for p in sorted((w / "margins").glob("*.npz"))])
  assert not np.array_equal(fg_prob(workdir), fg_prob(clean_run))  # the edit changed the method
  np.testing.assert_array_equal(fg_prob(workdir), fg_prob(fresh))


def test_damaged_units_are_remade_alone(voc, clean_run, tmp_path):
  """A features chunk, a margins chunk and a prediction truncated to half: each is found by its manifest's size
  and checksum, remade alone, and the result equals the clean run."""
  workdir = tmp_path / "damaged"
  shutil.copytree(clean_run, workdir)
  damaged = [workdir / "features" / "000001.npz", workdir / "margins" / "000000.npz",
             sorted((workdir / "predictions").glob("*.png"))[0]]
  for path in damaged:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  (workdir / "margins" / "000001.npz").write_bytes(b"x" * (workdir / "margins" / "000001.npz").stat().st_size)
  runner.run(_config(voc), workdir)
  decisions = json.loads((workdir / "manifests" / "last_start.json").read_text())
  assert fixtures.passes_run(workdir) == {"features", "image_level", "predictions", "report"}
  assert decisions["features"] == ["resume", "features/000001.npz damaged"]
  assert decisions["image_level"] == ["resume", "margins/000000.npz, margins/000001.npz damaged"]
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)
  for folder in ("features", "margins"):
    for path in sorted((clean_run / folder).glob("*.npz")):
      with np.load(path) as want, np.load(workdir / folder / path.name) as got:
        for member in want.files:
          np.testing.assert_array_equal(got[member], want[member], err_msg=f"{folder}/{path.name} {member}")


def test_a_full_disk_names_the_file_and_a_rerun_resumes(voc, clean_run, tmp_path, monkeypatch):
  """ENOSPC from the 4th file written (fsync): one UserError naming that file, no temp file left behind; with
  space again the same workdir resumes to the clean result."""
  workdir = tmp_path / "full"
  shutil.copytree(clean_run, workdir)
  shutil.rmtree(workdir / "predictions")
  shutil.rmtree(workdir / "descriptors")
  fsync, calls = os.fsync, []

  def full(fd):
    calls.append(fd)
    if len(calls) >= 4:
      raise OSError(28, "No space left on device")
    fsync(fd)

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(UserError, match=rf"^cannot write {workdir}/\S+: No space left on device \(free space"):
    runner.run(_config(voc), workdir)
  assert not list(workdir.rglob(".*.tmp"))
  assert not workdir_lock.is_held(workdir)
  monkeypatch.setattr(os, "fsync", fsync)
  runner.run(_config(voc), workdir)
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)


@pytest.mark.slow
def test_killed_at_every_pass_boundary_gives_the_same_outputs(voc, clean_run, tmp_path):
  *_, flags = voc
  workdir = tmp_path / "killed"
  for number, name in enumerate(PASSES):
    out = subprocess.run(_command(workdir, *flags), cwd=ROOT, env=dict(ENV, JAXSEG_TEST_KILL_AFTER=name),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == -signal.SIGKILL, (name, out.stderr[-3000:])
    assert fixtures.passes_run(workdir) == set(PASSES[number:]), name  # the earlier ones completed
    assert json.loads((workdir / "manifests" / f"{name}.json").read_text())["complete"], name
  _run(workdir, *flags)
  assert fixtures.passes_run(workdir) == {"report"}
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_killed_during_refinement_gives_the_same_outputs(voc, clean_run, tmp_path, signum):
  """SIGKILL, or SIGTERM (one line, exit 143, the workdir lock released), during refinement: a restart resumes."""
  *_, flags = voc
  workdir = tmp_path / "resumed"
  process = subprocess.Popen(_command(workdir, *flags), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not list((workdir / "masks").glob("*.png")) and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, "the run finished before it could be killed"
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=600)
  if signum == signal.SIGTERM:
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: "), stderr[-3000:]
    assert "Traceback" not in stderr
    with workdir_lock.hold(workdir):  # free: a held lock refuses with a UserError
      assert not list(workdir.rglob(".*.tmp"))  # nothing half-written
  assert not (workdir / "metrics.json").exists()
  _run(workdir, *flags)
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)


@pytest.mark.slow
def test_two_processes_give_the_same_outputs(voc, clean_run, tmp_path):
  """jax.distributed with 2 CPU processes on one workdir: each computes its chunks, process 0 the rest."""
  *_, flags = voc
  workdir = tmp_path / "shared"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  processes = [subprocess.Popen(_command(workdir, *flags, f"--config.distributed.coordinator_address=localhost:{port}",
                                         "--config.distributed.num_processes=2",
                                         f"--config.distributed.process_id={i}"),
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  fixtures.assert_same_segmentation(workdir, clean_run, SCORES)


def test_missing_weights_offline_gives_one_clear_message(voc, tmp_path):
  *_, flags = voc
  workdir = tmp_path / "work"
  env = dict(ENV, JAXSEG_CACHE=str(tmp_path / "cache"))
  flags = [f for f in flags if not f.startswith("--config.model.weights")] + ["--config.model.weights=hf"]
  out = subprocess.run(_command(workdir, *flags), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0
  assert "huggingface.co" in out.stderr and str(tmp_path / "cache") in out.stderr
  assert "--config.model.weights=random" in out.stderr  # the offline smoke run, with its exact flag
  errors = [line for line in out.stderr.splitlines() if "huggingface.co" in line]
  assert len(errors) == 1 and errors[0].startswith("error: "), errors  # printed once, as the one error line
  assert "bilateral_srgb" not in out.stderr  # ... and not after a config dump
  assert "Traceback" not in out.stderr
  assert not any((workdir / "features").glob("*.npz"))


@pytest.mark.parametrize("max_mb, max_bytes", [(5, 5 * 2**20), (-1, -1)])
def test_xla_cache_flags_set_jax_cache_with_a_fifth_of_a_second_threshold(tmp_path, monkeypatch, max_mb, max_bytes):
  """segment's --xla_cache_dir / --xla_cache_max_mb go through use_xla_cache. The threshold is below jax's 1 s
  default, so the refinement programs (about 1 s each on 2 cores) are kept whatever the machine's load."""
  from experiments.common import use_xla_cache
  names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  monkeypatch.setenv("HOME", str(tmp_path))
  try:
    use_xla_cache("~/xla", max_mb)  # nothing compiles before the settings are restored
    got = {name: getattr(jax.config, name) for name in names}
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
  assert got == {names[0]: str(tmp_path / "xla"), names[1]: max_bytes, names[2]: 0.2}

"""The runner on image folders: tiny splits under a VOC config, images added or replaced in a finished workdir,
awkward files. A rerun must equal a fresh run of the new folder and recompute only the chunks that changed.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import fixtures
from experiments import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"model.weights": "random", "image_size": 56, "batch_size": 2, "crf.iterations": 3, "gallery_size": 4}
PHOTOS = {"b": (40, 52), "d": (48, 40), "f": (44, 44)}  # sorted ids; an added "c" goes into the middle


def _config(folder: pathlib.Path, **changes):
  # VOC's 20 categories and 20 classes: more than 3 or 4 photos support.
  return fixtures.segment_config(ROOT / "configs" / "voc_dinov2_vits14.py",
                                 **{"data.name": f"folder:{folder}", **SMALL, **changes})






def _chunk_stamps(workdir: pathlib.Path) -> dict[str, int]:
  return {p.name: p.stat().st_mtime_ns for p in sorted((workdir / "features").glob("*.npz"))}




@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """(folder of 3 photos, a finished workdir of it)."""
  root = tmp_path_factory.mktemp("photos")
  folder = fixtures.make_photo_folder(root / "photos", PHOTOS)
  workdir = root / "work"
  runner.run(_config(folder), workdir)
  return folder, workdir


@pytest.mark.slow
def test_three_photos_run_with_a_voc_config(photos):
  folder, workdir = photos
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["num_images"] == 3 and "miou" not in metrics
  regions = sum(int(np.any(m)) for m in fixtures.read_pngs(workdir / "masks").values())  # one region per non-empty mask
  assert metrics["effective"] == {"num_categories": 3, "num_classes": min(20, regions)}
  assert metrics["config"]["method"]["num_categories"] == 20  # the config as given, next to what was used
  predictions = fixtures.read_pngs(workdir / "predictions")
  assert {name[:-4]: p.shape for name, p in predictions.items()} == PHOTOS
  assert all(p.max() <= metrics["effective"]["num_classes"] for p in predictions.values())


def _moved(photos, tmp_path):
  """A copy of the photos (same mtimes) elsewhere and a copy of their workdir: a location is in no fingerprint."""
  folder, workdir = photos
  shutil.copytree(folder, tmp_path / "photos")
  shutil.copytree(workdir, tmp_path / "work")
  return tmp_path / "photos", tmp_path / "work"


@pytest.mark.slow
def test_moved_folder_reuses_everything(photos, tmp_path):
  folder, workdir = _moved(photos, tmp_path)
  runner.run(_config(folder), workdir)
  assert fixtures.passes_run(workdir) == {"report"}


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["add", "replace"])
def test_changed_folder_equals_a_fresh_run(photos, tmp_path, edit):
  folder, workdir = _moved(photos, tmp_path)
  before = _chunk_stamps(workdir)
  if edit == "add":  # sorts between b and d: chunks [b, c] and [d, f] both change
    fixtures.make_photo_folder(folder, {"c": (36, 60)}, seed=5)
    unchanged = set()
  else:  # another picture of the same size and name: only its chunk (1, holding f) changes
    (folder / "f.jpg").unlink()
    fixtures.make_photo_folder(folder, {"f": PHOTOS["f"]}, seed=7)
    unchanged = {"000000.npz"}
  runner.run(_config(folder), workdir)
  assert fixtures.passes_run(workdir) == {"features", "dataset_level", "category_level", "image_level", "refinement",
                           "descriptors", "classes", "predictions", "report"}
  after = _chunk_stamps(workdir)
  assert {name for name in before if after.get(name) == before[name]} == unchanged
  fresh = tmp_path / "fresh"
  runner.run(_config(folder), fresh)
  fixtures.assert_same_segmentation(workdir, fresh, ("num_images", "fg_fraction", "effective"))
  for name in after:  # the reused chunks hold exactly what a fresh run computes
    with np.load(workdir / "features" / name) as ours, np.load(fresh / "features" / name) as theirs:
      assert sorted(ours.files) == sorted(theirs.files)
      for member in ours.files:
        np.testing.assert_array_equal(ours[member], theirs[member], err_msg=f"{name}:{member}")


def _segment(workdir: pathlib.Path, config: str, folder: pathlib.Path, *flags: str, env=None):
  command = [sys.executable, "-m", "experiments.segment", f"--workdir={workdir}", f"--config={config}",
             f"--config.data.name=folder:{folder}", *(f"--config.{k}={v}" for k, v in SMALL.items()), *flags]
  return subprocess.run(command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_image_added_after_a_kill_equals_a_fresh_run(tmp_path):
  """The issue's case: killed after the features, an image sorting into the middle added, resumed."""
  folder = fixtures.make_photo_folder(tmp_path / "photos", PHOTOS)
  workdir = tmp_path / "work"
  out = _segment(workdir, "configs/voc_dinov2_vits14.py", folder, env={"JAXSEG_TEST_KILL_AFTER": "features"})
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  fixtures.make_photo_folder(folder, {"c": (36, 60)}, seed=5)
  runner.run(_config(folder), workdir)
  fresh = tmp_path / "fresh"
  runner.run(_config(folder), fresh)
  fixtures.assert_same_segmentation(workdir, fresh, ("num_images", "fg_fraction", "effective"))
  assert json.loads((workdir / "metrics.json").read_text())["num_images"] == 4


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
def test_folder_of_awkward_images_with_the_binary(tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  sizes = _awkward_folder(folder)
  (folder / "empty.png").write_bytes(b"")
  (folder / "notes.jpg").write_text("not an image")
  whole = (folder / "large.jpg").read_bytes()
  (folder / "truncated.jpg").write_bytes(whole[:len(whole) // 2])  # its header reads, its pixels do not
  workdir = tmp_path / "work"
  out = _segment(workdir, "configs/demo.py", folder, "--config.method.num_classes=2")
  assert out.returncode == 0, out.stderr[-4000:]
  for name in ("empty.png", "notes.jpg", "truncated.jpg"):
    assert f"Skipping unreadable image file {folder / name}" in out.stderr, name
  predictions = fixtures.read_pngs(workdir / "predictions")
  assert {name[:-4]: p.shape for name, p in predictions.items()} == sizes
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert "miou" not in metrics and metrics["num_images"] == len(sizes)
  assert metrics["skipped"] == {"count": 3, "files": [str(folder / n) for n in ("empty.png", "notes.jpg",
                                                                               "truncated.jpg")]}
  assert 0.0 <= metrics["fg_fraction"]["refined"] <= 1.0


def test_every_pass_names_the_code_it_runs_and_its_hashes_follow_the_files(tmp_path):
  """Pass.code globs all match (a renamed module must be renamed in its declaration too), and code_hashes
  hashes each file's bytes: an edit changes exactly that file's entry."""
  from experiments import engine  # pylint: disable=g-import-not-at-top
  from experiments import passes  # pylint: disable=g-import-not-at-top
  for p in passes.SEGMENT:
    hashes = engine.code_hashes(p.code)
    assert any(path.startswith("experiments/passes/") for path in hashes) or p.always, p.name
  image_level = next(p for p in passes.SEGMENT if p.name == "image_level")
  assert "jaxseg/framework/fusion.py" in engine.code_hashes(image_level.code)
  assert "jaxseg/framework/fusion.py" not in engine.code_hashes(passes.SEGMENT[0].code)  # the features
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
  (tmp_path / "pkg" / "b.py").write_text("y = 2\n")
  before = engine.code_hashes(["pkg"], root=tmp_path)
  assert sorted(before) == ["pkg/a.py", "pkg/b.py"]
  (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
  after = engine.code_hashes(["pkg"], root=tmp_path)
  assert after["pkg/a.py"] != before["pkg/a.py"] and after["pkg/b.py"] == before["pkg/b.py"]
  with pytest.raises(ValueError, match="'pkg/c\\*' names no file"):
    engine.code_hashes(["pkg/c*"], root=tmp_path)

"""The runner's gallery tells the truth: legend, colours, banner, order and title, on tiny random-weight runs.

Everything expected is recomputed here from the files the run wrote (predictions/, masks/) and the fixture's
own ground-truth PNGs, with numpy and scipy's Hungarian matching, and the VOC palette of tests/fixtures.py;
the HTML is read with the standard library's parser.
"""

import html.parser
import pathlib
import re
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest
import scipy.optimize

import fixtures
from experiments import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = fixtures.SMALL_SEGMENT
NUM_CLASSES = SMALL["method.num_classes"]
VOC_NAMES = fixtures.VOC_CLASSES
PALETTE = np.asarray(fixtures.voc_palette(), np.uint8).reshape(-1, 3)


class _Page(html.parser.HTMLParser):
  """title, banner text, legend [(data-label, (r, g, b), text)], rows [(id, score text, [img src])]."""

  def __init__(self, text: str):
    super().__init__()
    self.title, self.h1, self.banner, self.legend, self.rows = "", "", None, [], []
    self._in, self._row = None, None
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag in ("title", "h1"):
      self._in = tag
    elif tag == "div" and attrs.get("class") == "banner":
      self._in, self.banner = "banner", ""
    elif tag == "li" and "data-label" in attrs:
      self._in = "li"
      self.legend.append([int(attrs["data-label"]), None, ""])
    elif tag == "span" and attrs.get("class") == "swatch":
      self.legend[-1][1] = tuple(int(c) for c in re.fullmatch(r"background:rgb\((\d+),(\d+),(\d+)\)",
                                                               attrs["style"]).groups())
    elif tag == "tr":
      self._row = ["", []]
    elif tag == "th" and self._row is not None and not self._row[0]:
      self._in = "row_th"
    elif tag == "img" and self._row is not None:
      self._row[1].append(attrs["src"])

  def handle_endtag(self, tag):
    if tag == "tr" and self._row is not None:
      if self._row[1]:
        image_id, score = self._row[0].split("\n")[:2]
        self.rows.append((image_id, score, self._row[1]))
      self._row = None
    if tag in ("title", "h1", "div", "li", "th"):
      self._in = None

  def handle_data(self, data):
    if self._in == "title":
      self.title += data
    elif self._in == "h1":
      self.h1 += data
    elif self._in == "banner":
      self.banner += data
    elif self._in == "li":
      self.legend[-1][2] += data
    elif self._in == "row_th":
      self._row[0] += data + "\n"


def _pixels(path: pathlib.Path) -> np.ndarray:
  return np.array(PIL.Image.open(path))


def _blend(image: np.ndarray, colour) -> np.ndarray:
  return np.rint(0.5 * image.astype(np.float64) + 0.5 * np.asarray(colour, np.float64))


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  ids = fixtures.make_voc_devkit(root / "manual", n_train=1, n_val=5)
  workdir = root / "work"
  runner.run(fixtures.segment_config(ROOT / "configs" / "voc_dinov2_vits14.py", **SMALL, **{
      "data.data_dir": str(root / "tfds"), "data.manual_dir": str(root / "manual")}), workdir)
  return root / "manual" / "VOCdevkit" / "VOC2012" / "SegmentationClass", ids["val"], workdir


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  folder = fixtures.make_photo_folder(root / "photos", {"d": (48, 40), "b": (40, 56), "f": (56, 48), "a": (44, 44),
                                                         "c": (40, 40)})
  workdir = root / "work"
  runner.run(fixtures.segment_config(ROOT / "configs" / "voc_dinov2_vits14.py",
                                     **{**SMALL, "data.name": f"folder:{folder}"}), workdir)
  return workdir


def test_gallery_with_ground_truth_names_matched_classes_in_their_truth_colours_worst_first(voc_run):
  seg, ids, workdir = voc_run
  page = _Page((workdir / "gallery.html").read_text())
  assert "worst foreground IoU first" in page.title and page.title == page.h1
  assert "random" in page.banner and "meaningless" in page.banner
  # the Hungarian matching over the split, and each image's foreground IoU, from the files
  cm = np.zeros((NUM_CLASSES + 1, 21), np.int64)
  iou = {}
  for image_id in ids:
    gt, pred = _pixels(seg / f"{image_id}.png"), _pixels(workdir / "predictions" / f"{image_id}.png")
    counted = gt != 255
    np.add.at(cm, (pred[counted], gt[counted]), 1)
    mask = _pixels(workdir / "masks" / f"{image_id}.png").astype(bool)
    union = np.sum((mask | (gt > 0)) & counted)
    iou[image_id] = np.sum(mask & (gt > 0) & counted) / union if union else 1.0
  rows, cols = scipy.optimize.linear_sum_assignment(cm, maximize=True)
  matched = dict(zip(rows.tolist(), cols.tolist()))
  shown = [row[0] for row in page.rows]
  assert len(shown) == 4 and set(shown) <= set(ids)
  assert [iou[i] for i in shown] == sorted(iou[i] for i in shown)  # worst first
  assert max(iou[i] for i in shown) <= min(iou[i] for i in set(ids) - set(shown))
  for (_, score, _), image_id in zip(page.rows, shown):
    assert score.strip() == f"{100 * iou[image_id]:.1f}%"
  expected, unmatched = {}, 21
  for label in range(NUM_CLASSES + 1):  # the colour each label is painted with: its class's, or beyond them
    expected[label] = matched[label] if label in matched else unmatched
    unmatched += label not in matched
  labels = set()
  for image_id, (_, _, (image_src, truth_src, pred_src)) in zip(shown, page.rows):
    image, truth, painted = (_pixels(workdir / src) for src in (image_src, truth_src, pred_src))
    pred, gt = _pixels(workdir / "predictions" / f"{image_id}.png"), _pixels(seg / f"{image_id}.png")
    assert painted.shape == image.shape == pred.shape + (3,)
    for label in np.unique(pred).tolist():
      labels.add(label)
      where = pred == label
      colour = expected[label]
      reference = _blend(image[where], PALETTE[colour]) if colour else image[where]
      assert np.abs(painted[where] - reference).max() <= 1, (image_id, label)
    for cls in set(np.unique(gt).tolist()) - {0}:  # the truth column paints class k in palette[k], as above
      assert np.abs(truth[gt == cls] - _blend(image[gt == cls], PALETTE[cls])).max() <= 1
  want = sorted((expected[label], f"{expected[label]}: " + (
      f"{VOC_NAMES[expected[label]]} (cluster {label - 1})" if expected[label] < 21
      else f"cluster {label - 1} (unmatched)")) for label in labels if label and expected[label])
  assert [(label, text) for label, _, text in page.legend] == want
  assert all(rgb == tuple(PALETTE[label]) for label, rgb, _ in page.legend)


def test_gallery_without_ground_truth_is_by_id_with_cluster_legend(folder_run):
  workdir = folder_run
  page = _Page((workdir / "gallery.html").read_text())
  assert "by image id" in page.title and "worst" not in page.title and page.title == page.h1
  assert "random" in page.banner
  shown = [row[0] for row in page.rows]
  assert shown == ["a", "b", "c", "d"]  # gallery_size 4 of 5, by id, not in the folder's or a score's order
  assert all(row[1].strip() == "n/a" and len(row[2]) == 2 for row in page.rows)
  labels = set()
  for image_id, (_, _, (image_src, pred_src)) in zip(shown, page.rows):
    image, painted = _pixels(workdir / image_src), _pixels(workdir / pred_src)
    pred = _pixels(workdir / "predictions" / f"{image_id}.png")
    for label in np.unique(pred).tolist():
      labels.add(label)
      where = pred == label
      reference = _blend(image[where], PALETTE[label]) if label else image[where]
      assert np.abs(painted[where] - reference).max() <= 1
  assert labels - {0}, "the fixture should predict some foreground"
  assert [(label, rgb, text) for label, rgb, text in page.legend] == [
      (label, tuple(PALETTE[label]), f"{label}: cluster {label - 1}") for label in sorted(labels - {0})]


def test_no_banner_unless_the_weights_were_random(folder_run, tmp_path):
  from experiments.passes import gallery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import jaxseg.data  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "work"
  shutil.copytree(folder_run / "predictions", workdir / "predictions")
  config = common.load_config_file(ROOT / "configs" / "voc_dinov2_vits14.py")
  config.data.name = f"folder:{folder_run.parent / 'photos'}"
  config.gallery_size = 2
  source = jaxseg.data.load(config.data.name, data_dir=str(tmp_path))
  ids = {i: source[i]["id"] for i in range(len(source))}
  ctx = types.SimpleNamespace(config=config, workdir=workdir, ids=ids, source=source,
                              method=types.SimpleNamespace(num_classes=NUM_CLASSES),
                              image_path=lambda folder, image_id: workdir / folder / f"{image_id}.png")
  gallery.write(ctx, np.arange(len(source)), None)
  page = _Page((workdir / "gallery.html").read_text())
  assert page.banner is None and len(page.rows) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium is not installed")
def test_gallery_renders_in_headless_chromium(folder_run, tmp_path):
  shot = tmp_path / "gallery.png"
  subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                  "--window-size=1200,900", (folder_run / "gallery.html").as_uri()], check=True, timeout=120,
                 capture_output=True)
  pixels = _pixels(shot)[..., :3]
  assert (np.abs(pixels.astype(int) - (187, 0, 0)).sum(-1) < 30).any()  # the red random-weights banner


def test_unmatched_labels_get_colours_of_no_class():
  from experiments.passes import gallery  # pylint: disable=g-import-not-at-top
  # 5 labels, 3 classes (P > G): labels 2 and 4 are matched to none; class 0 (background) stays unpainted
  colours = gallery.colour_map([0, 2, -1, 1, -1], 5, 3)
  assert colours.tolist() == [0, 2, 3, 1, 4]
  assert gallery.legend(np.array([[4, 0, 1], [2, 2, 3]]), colours, ["background", "cat", "dog"]) == [
      (1, "cat (cluster 2)"), (2, "dog (cluster 0)"), (3, "cluster 1 (unmatched)"), (4, "cluster 3 (unmatched)")]
  assert gallery.colour_map(None, 4, 0).tolist() == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="palette"):
    gallery.colour_map([-1] * 250, 250, 21)

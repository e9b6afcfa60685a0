"""The runner's gallery tells the truth: legend, colours, banner, order, notes and title, on tiny random-weight runs.

Everything expected is recomputed here from the files the run wrote (predictions/, masks/) and the fixture's
own ground-truth PNGs, with numpy and scipy's Hungarian matching, and the VOC palette of tests/fixtures.py;
the HTML is read with the standard library's parser, and what a person sees from headless Chromium's picture.
"""

import contextlib
import html.parser
import io
import os
import pathlib
import re
import shutil

import numpy as np
import PIL.Image
import pytest
import scipy.optimize

import fixtures
from experiments import runner
from experiments import screenshot
from jaxseg import viz

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = fixtures.SMALL_SEGMENT
NUM_CLASSES = SMALL["method.num_classes"]
VOC_NAMES = fixtures.VOC_CLASSES
PALETTE = np.asarray(fixtures.voc_palette(), np.uint8).reshape(-1, 3)
SHOWN = PALETTE.copy()
SHOWN[0] = viz.NEUTRAL  # background is shown grey, not VOC's black


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
        image_id, *notes = self._row[0].strip("\n").split("\n")
        self.rows.append((image_id, notes, self._row[1]))
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


def _notes(pred, iou=None) -> list[str]:
  """The notes a row must carry: the prediction's foreground share, and the IoU where there is ground truth."""
  return [f"foreground {100 * np.count_nonzero(pred) / pred.size:.1f}%"] + ([] if iou is None else [f"IoU {100 * iou:.1f}%"])


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  ids = fixtures.make_voc_devkit(root / "manual", n_train=1, n_val=5)
  workdir = root / "work"
  bars = io.StringIO()
  with contextlib.redirect_stderr(bars):  # tqdm writes to sys.stderr as it is when a bar starts
    runner.run(fixtures.segment_config(ROOT / "configs" / "voc_dinov2_vits14.py", **SMALL, **{
        "data.data_dir": str(root / "tfds"), "data.manual_dir": str(root / "manual")}), workdir)
  (root / "bars.txt").write_text(bars.getvalue())
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
  expected, unmatched = {}, 21
  for label in range(NUM_CLASSES + 1):  # the colour each label is painted with: its class's, or beyond them
    expected[label] = matched[label] if label in matched else unmatched
    unmatched += label not in matched
  labels = set()
  for image_id, (_, notes, (image_src, pred_src, truth_src)) in zip(shown, page.rows):
    image, painted, truth = (_pixels(workdir / src) for src in (image_src, pred_src, truth_src))
    pred, gt = _pixels(workdir / "predictions" / f"{image_id}.png"), _pixels(seg / f"{image_id}.png")
    assert notes == _notes(pred, iou[image_id]), image_id
    assert painted.shape == image.shape == truth.shape == pred.shape + (3,)
    for label in np.unique(pred).tolist():  # solid colours: each pixel exactly its label's colour
      labels.add(label)
      assert (painted[pred == label] == SHOWN[expected[label]]).all(), (image_id, label)
    for cls in np.unique(gt).tolist():  # the truth column paints class k in palette[k], background grey
      assert (truth[gt == cls] == SHOWN[cls]).all(), (image_id, cls)
  want = [(0, "0: background")] + sorted((expected[label], f"{expected[label]}: " + (
      f"{VOC_NAMES[expected[label]]} (cluster {label})" if expected[label] < 21
      else f"cluster {label} (unmatched)")) for label in labels if label and expected[label])
  assert [(label, text) for label, _, text in page.legend] == want
  assert all(rgb == tuple(SHOWN[label]) for label, rgb, _ in page.legend)


def test_gallery_without_ground_truth_is_by_id_with_cluster_legend(folder_run):
  workdir = folder_run
  page = _Page((workdir / "gallery.html").read_text())
  assert "by image id" in page.title and "worst" not in page.title and page.title == page.h1
  assert "random" in page.banner
  shown = [row[0] for row in page.rows]
  assert shown == ["a", "b", "c", "d"]  # gallery_size 4 of 5, by id, not in the folder's or a score's order
  labels = set()
  for image_id, (_, notes, images) in zip(shown, page.rows):
    image_src, pred_src = images  # no truth column
    image, painted = _pixels(workdir / image_src), _pixels(workdir / pred_src)
    pred = _pixels(workdir / "predictions" / f"{image_id}.png")
    assert notes == _notes(pred), image_id  # no IoU without ground truth
    assert painted.shape == image.shape
    for label in np.unique(pred).tolist():
      labels.add(label)
      assert (painted[pred == label] == SHOWN[label]).all()
  assert labels - {0}, "the fixture should predict some foreground"
  assert [(label, rgb, text) for label, rgb, text in page.legend] == [(0, viz.NEUTRAL, "0: background")] + [
      (label, tuple(PALETTE[label]), f"{label}: cluster {label}") for label in sorted(labels - {0})]


def test_every_progress_bar_of_a_run_reaches_its_total(voc_run):
  bars = (voc_run[2].parent / "bars.txt").read_text()
  last = {}  # each bar's last state, as tqdm redraws it after \r
  for state in re.finditer(r"([\w ()+]+?): +\d+%\|[^|]*\| (\d+)/(\d+)", bars):
    last[state.group(1).strip()] = (int(state.group(2)), int(state.group(3)))
  assert {"features", "refinement (CRF)", "predictions"} <= set(last), bars[-2000:]
  assert {name: n for name, (n, total) in last.items() if n != total} == {}, bars[-2000:]
  assert last["features"][1] >= 2  # several batches: the last one is the step that went missing


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


def _require_chromium():
  if screenshot.browser() is None:
    if os.environ.get("CI") == "true":  # CI must see the page: .ci/run installs chromium
      pytest.fail("chromium is not installed (.ci/run installs it with apt-get)")
    pytest.skip("headless chromium is not installed (apt-get install chromium)")


def test_gallery_renders_in_headless_chromium(voc_run):
  _require_chromium()
  page = voc_run[2] / "gallery.html"
  size = dict(width=1700, height=2400)
  boxes = screenshot.element_boxes(page, {"banner": ".banner", "swatch": ".swatch", "row": "tr",
                                          "img": "td img"}, **size)
  pixels = screenshot.screenshot(page, **size).astype(int)

  def crop(box):
    left, top, width, height = box
    assert top + height <= pixels.shape[0] and left + width <= pixels.shape[1], (box, pixels.shape)
    return pixels[top:top + height, left:left + width]

  (banner,) = boxes["banner"]
  assert (np.abs(crop(banner) - (187, 0, 0)).sum(-1) < 30).mean() > 0.5  # red, under its white text
  legend = _Page(page.read_text()).legend
  assert len(boxes["swatch"]) == len(legend) >= 2
  for (label, _, _), (left, top, width, height) in zip(legend, boxes["swatch"]):
    centre = pixels[top + height // 2, left + width // 2]
    assert tuple(centre) == tuple(SHOWN[label]), (label, centre)
  colours = {tuple(int(c) for c in SHOWN[label]) for label, _, _ in legend} | {(255, 255, 255)}  # + the page around a panel
  images = boxes["img"]
  assert len(images) == 3 * 4  # image, prediction, ground truth for the 4 rows shown
  for image_box, pred_box in zip(images[0::3], images[1::3]):
    assert max(image_box[2:]) >= 400 and image_box[2:] == pred_box[2:]  # large enough to read, side by side
    image, pred = crop(image_box), crop(pred_box)
    assert np.abs(image - pred).mean() > 20  # the prediction is not a faint tint over the image
    solid = np.isin(pred.reshape(-1, 3) @ [65536, 256, 1], [r * 65536 + g * 256 + b for r, g, b in colours])
    assert solid.mean() > 0.99  # in the legend's colours only


def test_unmatched_labels_get_colours_of_no_class():
  from experiments.passes import gallery  # pylint: disable=g-import-not-at-top
  # 5 labels, 3 classes (P > G): labels 2 and 4 are matched to none; class 0 (background) is listed first
  colours = gallery.colour_map([0, 2, -1, 1, -1], 5, 3)
  assert colours.tolist() == [0, 2, 3, 1, 4]
  assert gallery.legend(np.array([[4, 0, 1], [2, 2, 3]]), colours, ["background", "cat", "dog"]) == [
      (0, "background"), (1, "cat (cluster 3)"), (2, "dog (cluster 1)"), (3, "cluster 2 (unmatched)"),
      (4, "cluster 4 (unmatched)")]
  assert gallery.colour_map(None, 4, 0).tolist() == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="palette"):
    gallery.colour_map([-1] * 250, 250, 21)

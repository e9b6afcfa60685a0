"""Feature analysis: the probe and per-image 2-means on planted features, and the binary on a tiny VOC fixture.

Ground truths come from the planting (or numpy / scikit-learn), never from the code under test.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import sklearn.linear_model

import fixtures
from configs import analyze_voc
from experiments import analysis
from jaxseg import models
from jaxseg.framework import probe
from jaxseg.framework.features import border_patches

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
EXPECTED_COLUMNS = ["backbone", "layer", "feature", "two_means_prior_iou", "two_means_oracle_iou", "probe_accuracy",
                    "probe_iou", "framework_dataset_iou", "framework_category_iou", "framework_image_iou",
                    "framework_fused_iou"]


def _separable(rng: np.random.Generator, count: int, dim: int, gap: float) -> tuple[np.ndarray, np.ndarray]:
  """count points, ~30% foreground, the classes `gap` standard deviations apart along a random direction."""
  labels = rng.random(count) < 0.3
  direction = rng.normal(size=dim)
  direction /= np.linalg.norm(direction)
  x = rng.normal(size=(count, dim)) * rng.uniform(0.5, 3.0, size=dim) + 5.0  # uneven scales, offset
  return (x + np.where(labels, gap, 0.0)[:, None] * direction).astype(np.float32), labels


@pytest.mark.parametrize("batch_size", [None, 256])
def test_probe_separates_planted_classes(batch_size):
  rng = np.random.default_rng(0)
  x, labels = _separable(rng, 4000, 24, gap=8.0)
  mask = np.ones(2000, bool)
  mask[:100] = False  # unlabelled points carry a wrong label: they must not count
  train_labels = np.where(mask, labels[:2000], ~labels[:2000])
  fitted = probe.fit_probe(jnp.asarray(x[:2000]), jnp.asarray(train_labels), jnp.asarray(mask),
                           key=jax.random.key(0), batch_size=batch_size)
  pred = np.asarray(probe.probe_logits(fitted, jnp.asarray(x[2000:]))) > 0
  assert (pred == labels[2000:]).mean() >= 0.95


def test_probe_agrees_with_scikit_learn():
  rng = np.random.default_rng(1)
  x, labels = _separable(rng, 3000, 16, gap=2.0)  # overlapping classes: the boundary matters
  fitted = probe.fit_probe(jnp.asarray(x[:1500]), jnp.asarray(labels[:1500]), key=jax.random.key(0), steps=500)
  ours = np.asarray(probe.probe_logits(fitted, jnp.asarray(x[1500:]))) > 0
  mean, std = x[:1500].mean(0), x[:1500].std(0)
  reference = sklearn.linear_model.LogisticRegression(C=1e4).fit((x[:1500] - mean) / std, labels[:1500])
  theirs = reference.predict((x[1500:] - mean) / std).astype(bool)
  assert (ours == theirs).mean() >= 0.98
  assert abs((ours == labels[1500:]).mean() - (theirs == labels[1500:]).mean()) <= 0.01


def test_probe_without_training_points_is_finite():
  fitted = probe.fit_probe(jnp.ones((8, 3)), jnp.zeros(8, bool), jnp.zeros(8, bool), key=jax.random.key(0), steps=5)
  assert all(np.all(np.isfinite(np.asarray(a))) for a in fitted)
  np.testing.assert_array_equal(np.asarray(probe.probe_logits(fitted, jnp.ones((2, 3)))), 0.0)


def _planted_images(rng: np.random.Generator, count: int, side: int, dim: int):
  """Per image a random interior rectangle of foreground; its own fg and bg directions plus noise."""
  fg = np.zeros((count, side, side), bool)
  for image in fg:
    top, left = rng.integers(1, side // 2, size=2)
    image[top:top + rng.integers(3, side // 2), left:left + rng.integers(3, side // 2)] = True
  centres = rng.normal(size=(count, 2, dim))
  x = centres[np.arange(count)[:, None, None], fg.astype(int)] + 0.4 * rng.normal(size=(count, side, side, dim))
  attention = np.where(fg, 0.02, 0.005) + 0.002 * rng.random(fg.shape)
  return x.astype(np.float32), fg, attention.astype(np.float32)


def _numpy_iou(pred: np.ndarray, target: np.ndarray) -> float:
  return (pred & target).sum() / (pred | target).sum()


@pytest.mark.parametrize("fg_prior", ["border", "attention"])
def test_two_means_finds_planted_foreground(fg_prior):
  rng = np.random.default_rng(2)
  count, side, dim = 6, 10, 16
  x, fg, attention = _planted_images(rng, count, side, dim)
  valid = np.ones((count, side, side), bool)
  valid[-1] = False  # a padded image: never clustered, never counted
  counted = valid.copy()
  counted[0, 0, :] = False  # unlabelled patches are not counted
  border = np.asarray(border_patches(jnp.asarray(valid)))
  flat = lambda a: jnp.asarray(a.reshape(count, side * side, *a.shape[3:]))
  result = probe.two_means_counts(flat(x), flat(valid), flat(border), flat(attention), flat(fg), flat(counted),
                                  key=jax.random.key(0), fg_prior=fg_prior, n_init=2)
  pred = np.asarray(result.prior_mask).reshape(fg.shape)
  assert _numpy_iou(pred & counted, fg & counted) >= 0.9
  tp, fp, fn, tn = np.asarray(result.prior).sum(0)
  assert tp + fp + fn + tn == counted.sum()
  assert tp / (tp + fp + fn) == pytest.approx(_numpy_iou(pred & counted, fg & counted))
  assert np.asarray(result.oracle).sum(0)[0] >= 0.9 * (fg & counted).sum()


def test_two_means_of_a_scalar_thresholds_it():
  rng = np.random.default_rng(3)
  _, fg, attention = _planted_images(rng, 4, 8, 2)
  flat = lambda a: jnp.asarray(a.reshape(4, 64))
  ones = np.ones(fg.shape, bool)
  result = probe.two_means_counts(flat(attention)[..., None], flat(ones), flat(np.zeros_like(ones)), flat(attention),
                                  flat(fg), flat(ones), key=jax.random.key(1), fg_prior="attention",
                                  metric="euclidean", n_init=1)
  np.testing.assert_array_equal(np.asarray(result.prior_mask).reshape(fg.shape), fg)


def test_prior_never_chooses_an_empty_cluster():
  labels = jnp.asarray([[0, 0, 0, 0], [1, 1, 0, -1]])
  border = jnp.asarray([[True, True, False, False], [True, False, True, False]])
  chosen = probe.prior_foreground_cluster(labels, border, jnp.zeros((2, 4)), "border")
  # image 0: cluster 1 is empty; image 1: cluster 0 = {2} all border, cluster 1 = {0, 1} half border.
  np.testing.assert_array_equal(np.asarray(chosen), [0, 1])


def test_counts_and_scores_match_numpy():
  rng = np.random.default_rng(4)
  pred, target, counted = (rng.random((3, 5, 7)) < p for p in (0.4, 0.3, 0.8))
  counts = np.asarray(probe.binary_counts(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(counted)))
  for image in range(3):
    p, t = pred[image][counted[image]], target[image][counted[image]]
    np.testing.assert_array_equal(counts[image], [np.sum(p & t), np.sum(p & ~t), np.sum(~p & t), np.sum(~p & ~t)])
  scores = probe.count_scores(counts.sum(0))
  p, t = pred[counted], target[counted]
  assert scores["accuracy"] == pytest.approx(np.mean(p == t))
  assert scores["iou"] == pytest.approx(np.sum(p & t) / np.sum(p | t))
  with pytest.raises(ValueError, match="no labelled patch"):
    probe.count_scores(np.zeros(4, np.int64))


def test_patch_labels_majority_and_void():
  rng = np.random.default_rng(5)
  mask = rng.choice(np.array([0, 0, 7, 255], np.uint8), size=(24, 36))
  labels = probe.patch_labels(mask, (4, 6))
  cells = mask.reshape(4, 6, 6, 6).transpose(0, 2, 1, 3).reshape(4, 6, 36)
  void, fg = (cells == 255).sum(-1), ((cells != 0) & (cells != 255)).sum(-1)
  bg = 36 - void - fg
  np.testing.assert_array_equal(labels, np.where(void > 18, -1, (fg > bg).astype(int)))


def test_framework_scores_from_a_float16_cache_find_planted_foreground(tmp_path):
  rng = np.random.default_rng(6)
  count, side, dim = 6, 8, 16
  _, fg, attention = _planted_images(rng, count, side, dim)
  centres = rng.normal(size=(2, dim))  # one fg and one bg direction for the whole split
  x = centres[fg.astype(int)] + 0.3 * rng.normal(size=(count, side, side, dim))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  cache = analysis._FeatureCache(tmp_path / "features.npy", x.shape)
  cache.array[:] = x
  cls = rng.normal(size=(count, dim)).astype(np.float32)
  features = analysis.PatchFeatures(patches=cache, cls=jnp.asarray(cls / np.linalg.norm(cls, axis=-1, keepdims=True)),
                                    attention=jnp.asarray(attention), valid=jnp.ones(fg.shape, bool))
  method = analysis.MethodConfig(num_categories=2, sample_budget=500, kmeans_n_init=2)
  counted = np.ones(fg.shape, bool)
  scores = analysis.framework_scores(features, fg, counted, method, key=jax.random.key(0), batch_size=4)
  assert set(scores) == {"dataset", "category", "image", "fused"}
  assert min(scores.values()) >= 0.9, scores


def _config(**changes):
  return fixtures.override(analyze_voc.get_config(), **changes)


def test_bad_image_size_and_blocks_are_named(tmp_path):
  with pytest.raises(ValueError, match="multiple of 112"):
    analysis.run(_config(image_size=100), tmp_path)
  with pytest.raises(ValueError, match="out of range for dino_vits8"):
    analysis.cells(_config(blocks=(12,)), models.VARIANTS["dino_vits8"], "dino_vits8")
  with pytest.raises(ValueError, match="unknown"):
    analysis.cells(_config(features=("keys",)), models.VARIANTS["dino_vits8"], "dino_vits8")


# ---- the binary --------------------------------------------------------------------------------------

BACKBONES = ("dino_vits8", "dinov2_vits14")
BLOCKS = (2, -1)
FEATURES = ("k", "tokens", "cls-attention")


def _run(workdir, flags, check=True):
  out = subprocess.run([sys.executable, "-m", "experiments.analyze_features", f"--workdir={workdir}", *flags],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  fixtures.make_voc_devkit(root / "manual", n_train=2, n_val=3)
  flags = ["--config=configs/analyze_voc.py", "--config.model.weights=random",
           f"--config.data.data_dir={root / 'tfds'}", f"--config.data.manual_dir={root / 'manual'}", "--config.image_size=112", "--config.batch_size=2",
           f"--config.blocks={BLOCKS}", f"--config.features={FEATURES}",
           "--config.method.num_categories=2", "--config.method.sample_budget=1000", "--config.two_means.n_init=1",
           "--config.probe.steps=50", "--config.figure_images=2"]
  workdir = root / "work"
  _run(workdir, flags + [f"--config.backbones={BACKBONES}"])
  return workdir, flags


@pytest.mark.slow
def test_binary_writes_csv_markdown_and_figures(analysed):
  workdir, _ = analysed
  with open(workdir / "analysis.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == EXPECTED_COLUMNS
    rows = list(reader)
  expected_cells = []
  for name in BACKBONES:
    depth = models.VARIANTS[name].depth
    blocks = sorted(b % depth for b in BLOCKS)
    expected_cells += [(name, str(b), f) for b in blocks for f in ("k", "tokens")] + [(name, str(depth - 1),
                                                                                          "cls-attention")]
  assert [(r["backbone"], r["layer"], r["feature"]) for r in rows] == expected_cells
  for row in rows:
    for column in EXPECTED_COLUMNS[3:7]:
      assert 0.0 <= float(row[column]) <= 1.0, (row, column)
    method_cell = row["layer"] == str(models.VARIANTS[row["backbone"]].depth - 1) and row["feature"] == "k"
    for column in EXPECTED_COLUMNS[7:]:
      assert (row[column] != "") == method_cell, (row, column)
      if method_cell:
        assert 0.0 <= float(row[column]) <= 1.0
  text = (workdir / "analysis.md").read_text()
  assert "randomly initialised" in text
  for name in BACKBONES:
    assert f"| {name} |" in text
  assert text.count("**") >= 2 * len(BACKBONES) * 4  # best of each score per backbone, bold
  for figure in [f"heatmap_{name}.png" for name in BACKBONES] + ["examples.png"]:
    with PIL.Image.open(workdir / "figures" / figure) as image:
      assert image.format == "PNG" and min(image.size) > 100
  assert not list(workdir.rglob("*.npy")) and not list(workdir.rglob(".*.tmp"))


def _decisions(workdir) -> dict:
  return json.loads((workdir / "manifests" / "last_start.json").read_text())


@pytest.mark.slow
def test_rerun_reuses_backbones_and_recomputes_after_a_config_or_code_change(analysed, tmp_path):
  """A subset of the backbones reuses them; another two_means.n_init, or an edit of the fusion code in a copy
  of the package, recomputes the backbone (no refusal), and equals a fresh workdir's result."""
  workdir, flags = analysed
  results = {p: p.stat().st_mtime_ns for p in (workdir / "backbones").glob("*.json")}
  csv_before = (workdir / "analysis.csv").read_text()
  _run(workdir, flags + [f"--config.backbones={BACKBONES[1:]}"])  # a subset: nothing recomputed
  assert _decisions(workdir) == {f"backbone_{BACKBONES[1]}": ["reuse", ""]}
  assert {p: p.stat().st_mtime_ns for p in (workdir / "backbones").glob("*.json")} == results
  assert (workdir / "analysis.csv").read_text() == "".join(
      line for line in csv_before.splitlines(keepends=True) if not line.startswith(BACKBONES[0]))
  changed = flags + [f"--config.backbones={BACKBONES[1:]}", "--config.two_means.n_init=2"]
  _run(workdir, changed)
  assert _decisions(workdir) == {f"backbone_{BACKBONES[1]}": ["recompute", "config two_means.n_init changed"]}
  fresh = tmp_path / "fresh"
  _run(fresh, changed)
  assert (workdir / "analysis.csv").read_text() == (fresh / "analysis.csv").read_text()

  code = tmp_path / "code"
  for folder in ("jaxseg", "experiments", "configs"):
    shutil.copytree(ROOT / folder, code / folder, ignore=shutil.ignore_patterns("__pycache__"))
  with open(code / "jaxseg" / "framework" / "fusion.py", "a") as f:
    f.write("# edited\n")
  out = subprocess.run([sys.executable, "-m", "experiments.analyze_features", f"--workdir={workdir}", *changed],
                       cwd=code, env=dict(ENV, PYTHONPATH=str(code)), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert _decisions(workdir) == {f"backbone_{BACKBONES[1]}": ["recompute", "code jaxseg/framework/fusion.py changed"]}
  assert (workdir / "analysis.csv").read_text() == (fresh / "analysis.csv").read_text()

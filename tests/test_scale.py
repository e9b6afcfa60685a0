"""Data parallelism: 4 forced host devices and 2 real processes compute what one device computes.

Sharded runs happen in subprocesses (XLA_FLAGS=--xla_force_host_platform_device_count=N, and
jax.distributed on localhost for two processes); the reference is the same computation on one
device, plus the planted clusters for k-means labels.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest

import fixtures
from jaxseg import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _pngs(folder: pathlib.Path) -> dict[str, np.ndarray]:
  return {p.name: np.array(PIL.Image.open(p)) for p in sorted(folder.glob("*.png"))}


def _start(command, env, log: pathlib.Path) -> subprocess.Popen:
  """Starts a runner with its output in a file (a pipe nobody reads could fill up and block it)."""
  with open(log, "wb") as f:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, log: pathlib.Path, timeout=600) -> None:
  process.wait(timeout=timeout)
  assert process.returncode == 0, log.read_text()[-4000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ---- helpers on one device ---------------------------------------------------------------------------

def test_pad_batch_pads_with_zeros_and_false():
  images, valid = np.ones((3, 2, 2), np.float32), np.ones(3, bool)
  padded_images, padded_valid = parallel.pad_batch((images, valid), 4)
  assert padded_images.shape == (4, 2, 2) and not padded_images[3].any()
  np.testing.assert_array_equal(padded_valid, [True, True, True, False])
  assert parallel.pad_batch(valid, 3) is valid
  assert [parallel.padded_size(n, 4) for n in (0, 1, 4, 5)] == [0, 4, 4, 8]
  with pytest.raises(ValueError, match="leading axis"):
    parallel.pad_batch((images, np.ones(2, bool)), 4)


def test_shard_batch_and_to_host_round_trip():
  mesh = parallel.batch_mesh()
  batch = {"x": np.arange(6.0).reshape(3, 2), "valid": np.array([True, False, True])}
  host = parallel.to_host(parallel.shard_batch(batch, mesh))
  np.testing.assert_array_equal(host["x"], batch["x"])
  np.testing.assert_array_equal(host["valid"], batch["valid"])
  with pytest.raises(ValueError, match="pad_batch"):
    parallel.shard_batch(np.float32(1.0), mesh)


# ---- ViT, k-means and cluster sums on 4 devices ------------------------------------------------------

_SHARDED_SCRIPT = textwrap.dedent("""
    import dataclasses, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxseg import framework, models, parallel
    from jaxseg.cluster import kmeans

    assert jax.device_count() == 4, jax.devices()
    mesh = parallel.batch_mesh()
    on_mesh = lambda tree: parallel.shard_batch(parallel.pad_batch(tree, mesh.size), mesh)
    rng = np.random.default_rng(0)
    out = {}

    cfg = dataclasses.replace(models.get_variant("dinov2_vits14"), depth=2)
    params = models.init_params(cfg, jax.random.key(0))
    images = rng.normal(size=(6, 28, 28, 3)).astype(np.float32)  # 6 images: padded to 8 for 4 devices
    encode = jax.jit(models.encode, static_argnames=("cfg",))
    one = encode(params, jnp.asarray(images), cfg)
    many = encode(parallel.replicate(params, mesh), on_mesh(images), cfg)
    out["encode_devices"] = len(many.k.sharding.device_set)
    for name in ("cls", "k"):
      out[f"{name}_one"], out[f"{name}_many"] = np.asarray(getattr(one, name)), parallel.to_host(getattr(many, name))

    centers = rng.normal(size=(3, 16)) * 8
    planted = rng.integers(0, 3, 1001)  # 1001 points: padded to 1004
    x = (centers[planted] + rng.normal(size=(1001, 16))).astype(np.float32)
    mask = np.ones(1001, bool)
    key = jax.random.key(1)
    one = kmeans(jnp.asarray(x), 3, key=key, mask=jnp.asarray(mask))
    xs, ms = on_mesh((x, mask))
    many = kmeans(xs, 3, key=key, mask=ms)
    out["kmeans_devices"] = len(xs.sharding.device_set)
    out["planted"] = planted
    for name in ("centroids", "labels", "inertia"):
      out[f"{name}_one"], out[f"{name}_many"] = np.asarray(getattr(one, name)), parallel.to_host(getattr(many, name))

    patches = rng.normal(size=(6, 3, 3, 16)).astype(np.float32)
    valid = rng.random((6, 3, 3)) > 0.2
    features = framework.PatchFeatures(patches=np.where(valid[..., None], patches, 0), cls=patches[:, 0, 0],
                                       attention=rng.random((6, 3, 3)).astype(np.float32), valid=valid)
    centroids = jnp.asarray(rng.normal(size=(3, 16)).astype(np.float32))
    one = framework.dataset_cluster_stats(jax.tree.map(jnp.asarray, features), centroids)
    many = framework.dataset_cluster_stats(on_mesh(features), parallel.replicate(centroids, mesh))
    for name in one._fields:
      out[f"stats_{name}_one"], out[f"stats_{name}_many"] = np.asarray(getattr(one, name)), np.asarray(getattr(many, name))
    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  path = tmp_path_factory.mktemp("sharded") / "out.npz"
  done = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, str(path)], cwd=ROOT, env=_env(4),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  with np.load(path) as f:
    return dict(f)


def test_sharded_encode_equals_one_device(sharded):
  assert sharded["encode_devices"] == 4
  for name in ("cls", "k"):
    assert sharded[f"{name}_many"].shape[0] == 8
    np.testing.assert_allclose(sharded[f"{name}_many"][:6], sharded[f"{name}_one"], rtol=1e-5, atol=1e-5)


def test_sharded_kmeans_equals_one_device_and_finds_planted_clusters(sharded):
  assert sharded["kmeans_devices"] == 4
  labels = sharded["labels_many"]
  np.testing.assert_array_equal(labels[1001:], -1)  # padding
  np.testing.assert_array_equal(labels[:1001], sharded["labels_one"])
  # Planted clusters, found up to a permutation: every planted cluster maps to exactly one label.
  pairs = set(zip(sharded["planted"].tolist(), labels[:1001].tolist()))
  assert len(pairs) == 3 and len({p for p, _ in pairs}) == 3 and len({l for _, l in pairs}) == 3
  np.testing.assert_allclose(sharded["centroids_many"], sharded["centroids_one"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sharded["inertia_many"], sharded["inertia_one"], rtol=1e-5)


def test_sharded_cluster_sums_equal_one_device(sharded):
  for name in ("count", "border_count", "attention_sum"):
    np.testing.assert_allclose(sharded[f"stats_{name}_many"], sharded[f"stats_{name}_one"], rtol=1e-6)
  assert sharded["stats_count_one"].sum() > 0


# ---- the helpers across 2 processes (jax.distributed on localhost, 2 devices each) --------------------

_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", 2, process_id)
    from jaxseg import parallel
    mesh = parallel.batch_mesh()  # every device of both processes
    rows = np.arange(6.0).reshape(3, 2) + 100 * process_id  # 3 rows per process: padded to 4
    x, valid = parallel.shard_batch(parallel.pad_batch((rows, np.ones(3, bool)), len(mesh.local_devices)), mesh)
    total = jax.jit(lambda x, valid: (x * valid[:, None]).sum(0))(x, valid)
    np.savez(out, devices=len(x.sharding.device_set), **parallel.to_host({"x": x, "valid": valid, "total": total}))
""")


def test_shard_batch_and_to_host_across_two_processes(tmp_path):
  port = _free_port()
  logs = [tmp_path / f"{i}.log" for i in range(2)]
  processes = [_start([sys.executable, "-c", _PROCESS_SCRIPT, str(i), str(port), str(tmp_path / f"{i}.npz")],
                      _env(2), logs[i]) for i in range(2)]
  for process, log in zip(processes, logs):
    _wait(process, log, timeout=300)
  rows = [np.arange(6.0).reshape(3, 2) + 100 * i for i in range(2)]
  for i in range(2):
    with np.load(tmp_path / f"{i}.npz") as got:
      assert got["devices"] == 4
      np.testing.assert_array_equal(got["x"], np.concatenate([rows[0], [[0, 0]], rows[1], [[0, 0]]]))
      np.testing.assert_array_equal(got["valid"], [True] * 3 + [False] + [True] * 3 + [False])
      np.testing.assert_array_equal(got["total"], rows[0].sum(0) + rows[1].sum(0))


# ---- the segment runner: 1 device, 4 devices, 2 processes --------------------------------------------

RUNNER_FLAGS = ["--config.model.weights=random", "--config.image_size=56", "--config.batch_size=3",
                "--config.method.num_classes=3", "--config.method.num_categories=2", "--config.crf.iterations=3",
                "--config.gallery_size=2", "--config.method.sample_budget=4096"]


def _segment(workdir, config_file: str, *overrides) -> list[str]:
  return [sys.executable, "-m", "experiments.segment", f"--workdir={workdir}", f"--config={config_file}",
          *RUNNER_FLAGS, *overrides]


def _uniform_voc(root: pathlib.Path, n_val: int, size: tuple[int, int]) -> list[str]:
  """The VOC fixture at one size (one CRF compilation per run), each image painted flat from its mask.

  Flat colours give decisive foreground probabilities even with random weights: where they sit at
  0.5, float rounding that differs between device layouts (reduction order) could flip a pixel.
  """
  ids = fixtures.make_voc_devkit(root, n_train=1, n_val=n_val, n_detection_only=0)
  devkit = root / "VOCdevkit" / "VOC2012"
  colours = np.asarray(fixtures.voc_palette(), np.uint8).reshape(256, 3)
  for path in (devkit / "SegmentationClass").glob("*.png"):
    mask = PIL.Image.open(path)
    resized = mask.resize(size, PIL.Image.NEAREST)
    resized.putpalette(mask.getpalette())
    resized.save(path)
    labels = np.array(resized)
    pixels = np.where((labels == 0)[..., None] | (labels == 255)[..., None], 128, colours[labels])
    PIL.Image.fromarray(pixels.astype(np.uint8)).save(devkit / "JPEGImages" / f"{path.stem}.jpg", quality=95)
  return ids["val"]


@pytest.mark.slow
def test_runner_writes_same_outputs_on_4_devices_2_processes_and_batches_of_2(tmp_path):
  """sample_budget (64) below the split's 112 patches: the reservoirs, keyed per image, must not depend on
  the batch size (3 or 2), the device count (1 or 4) or the process count (1 or 2)."""
  val_ids = _uniform_voc(tmp_path / "manual", n_val=7, size=(48, 40))  # chunks of 3, 3, 1 on 4 devices
  data = ["configs/voc_dinov2_vits14.py", f"--config.data.data_dir={tmp_path / 'tfds'}",
          f"--config.data.manual_dir={tmp_path / 'manual'}", "--config.method.sample_budget=64"]
  one, four, two, batch2 = tmp_path / "one", tmp_path / "four", tmp_path / "two", tmp_path / "batch2"
  logs = {name: tmp_path / f"{name}.log" for name in ("one", "four", "two0", "two1", "batch2")}
  _wait(_start(_segment(one, *data), _env(1), logs["one"]), logs["one"])  # prepares the TFDS dataset first
  port = _free_port()
  runs = [(_start(_segment(two, *data, f"--config.distributed.coordinator_address=localhost:{port}",
                           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                  _env(2), logs[f"two{i}"]), logs[f"two{i}"]) for i in range(2)]
  runs.append((_start(_segment(four, *data), _env(4), logs["four"]), logs["four"]))
  for process, log in runs:
    _wait(process, log)
  _wait(_start(_segment(batch2, *data, "--config.batch_size=2"), _env(1), logs["batch2"]), logs["batch2"])

  reference = _pngs(one / "predictions")
  assert sorted(reference) == sorted(f"{i}.png" for i in val_ids)
  metrics = json.loads((one / "metrics.json").read_text())
  for workdir in (four, two, batch2):
    for folder in ("predictions", "masks"):
      got, want = _pngs(workdir / folder), _pngs(one / folder)
      assert got.keys() == want.keys(), (workdir, folder)
      for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{workdir.name}/{folder}/{name}")
    for name in ("dataset", "category"):
      got, want = np.load(workdir / "levels" / f"{name}.npz"), np.load(one / "levels" / f"{name}.npz")
      for member in ("centroids", "prototypes"):
        # Features differ by float16 rounding between device layouts (atol 2e-3 below); samples of other patches
        # would differ by far more.
        np.testing.assert_allclose(got[member], want[member], atol=1e-3, err_msg=f"{workdir.name} {name} {member}")
    got = json.loads((workdir / "metrics.json").read_text())
    for key in ("num_images", "miou", "pixel_accuracy", "fg_iou", "fg_iou_levels"):
      assert got[key] == pytest.approx(metrics[key], abs=1e-12), (workdir.name, key)
  for workdir in (four, two):
    for c in range(3):
      got, want = np.load(workdir / "features" / f"{c:06d}.npz"), np.load(one / "features" / f"{c:06d}.npz")
      assert got["cls"].shape[0] == 3  # the cache holds the chunk's own images only
      np.testing.assert_array_equal(got["index"], want["index"])
      np.testing.assert_allclose(got["cls"], want["cls"], atol=1e-5)
      np.testing.assert_allclose(got["patches"].astype(np.float32), want["patches"].astype(np.float32), atol=2e-3)


# ---- host memory ------------------------------------------------------------------------------------

def _peak_rss_bytes(command, env, log: pathlib.Path) -> int:
  """Peak resident memory of a child process (ru_maxrss of that child alone)."""
  process = _start(command, env, log)
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  assert process.returncode == 0, log.read_text()[-4000:]
  return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_number_of_images(tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(160):
    image = np.kron(rng.integers(0, 255, (4, 4, 3), np.uint8), np.ones((8, 8, 1), np.uint8))  # 32x32 blocks
    PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")
  peaks = {}
  for limit in (40, 160):
    workdir = tmp_path / f"work{limit}"
    peaks[limit] = _peak_rss_bytes(
        _segment(workdir, "configs/demo.py", f"--config.data.name=folder:{folder}", f"--config.data.limit={limit}",
                 "--config.image_size=28", "--config.batch_size=8", "--config.method.num_classes=2"),
        _env(1), tmp_path / f"work{limit}.log")
    assert json.loads((workdir / "metrics.json").read_text())["num_images"] == limit
  assert abs(peaks[160] - peaks[40]) < 0.1 * peaks[40], peaks

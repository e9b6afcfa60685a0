"""One run per workdir (the flock), temp files cleaned only under it, outputs with the umask's mode.

The concurrent-run test starts the real segment binary twice on one workdir (tiny folder, random
weights): the second is refused within seconds naming the first's pid and host, and the first
finishes with its outputs complete.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import PIL.Image
import pytest

import fixtures
from experiments import common
from experiments import workdir_lock
from experiments.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")

_HOLDER = textwrap.dedent("""
    import sys, time
    from experiments import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
      print("held", flush=True)
      time.sleep(600)
""")


def _start_holder(workdir: pathlib.Path) -> subprocess.Popen:
  """Another process holding workdir's lock (it has printed 'held' when this returns)."""
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def test_second_holder_is_refused_with_pid_and_host_and_a_killed_holder_leaves_no_lock(tmp_path):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(UserError) as refused:
      with workdir_lock.hold(tmp_path):
        pass
    assert f"pid {holder.pid}" in str(refused.value) and socket.gethostname() in str(refused.value)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir_lock.hold(tmp_path):  # the kernel released the killed holder's lock
    assert workdir_lock.is_held(tmp_path)
    info = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid()
  assert not workdir_lock.is_held(tmp_path)


def test_stale_temp_files_are_removed_only_under_the_lock(tmp_path):
  (tmp_path / "masks").mkdir()
  stale = [tmp_path / ".metrics.json.ab12.tmp", tmp_path / "masks" / ".a.png.cd34.tmp"]
  kept = [tmp_path / "metrics.json", tmp_path / "masks" / "a.png", tmp_path / "masks" / "b.tmp"]
  for path in stale + kept:
    path.write_text("x")
  with pytest.raises(RuntimeError, match="outside"):
    workdir_lock.clean_stale_temp_files(tmp_path)
  assert all(p.exists() for p in stale)
  with workdir_lock.hold(tmp_path):
    assert sorted(workdir_lock.clean_stale_temp_files(tmp_path)) == sorted(stale)
  assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_umask_mode(tmp_path, umask, mode):
  previous = os.umask(umask)
  try:
    common.save_json(tmp_path / "metrics.json", {"a": 1})
    common.save_png(tmp_path / "p" / "mask.png", np.zeros((2, 3), np.uint8))
    common.save_npz(tmp_path / "f.npz", x=np.zeros(2))
  finally:
    os.umask(previous)
  for name in ("metrics.json", "p/mask.png", "f.npz"):
    assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
  assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_concurrent_segment_run_is_refused_and_first_run_completes(tmp_path):
  folder = fixtures.make_photo_folder(tmp_path / "photos", {str(i): (40, 40) for i in range(4)})
  workdir = tmp_path / "work"
  command = [sys.executable, "-m", "experiments.segment", f"--workdir={workdir}", "--config=configs/demo.py",
             f"--config.data.name=folder:{folder}", "--config.model.weights=random", "--config.image_size=28",
             "--config.batch_size=2", "--config.method.num_classes=2", "--config.method.num_categories=1",
             "--config.crf.iterations=2", "--config.gallery_size=2", "--xla_cache_dir="]
  with open(tmp_path / "first.log", "wb") as log:
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
  lock = workdir / workdir_lock.LOCK_NAME
  deadline = time.time() + 300
  while not (lock.exists() and lock.read_text()) and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
  start = time.time()
  second = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  refused_after = time.time() - start
  assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
  assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
  assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr, second.stderr[-3000:]
  assert refused_after < 30, refused_after
  assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
  assert not list(workdir.rglob(".*.tmp"))
  # Unaffected: the same outputs as a run that had the workdir to itself.
  alone = tmp_path / "alone"
  command[3] = f"--workdir={alone}"
  done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for folder in ("predictions", "masks"):
    got, want = _pngs(workdir / folder), _pngs(alone / folder)
    assert sorted(got) == [f"{i}.png" for i in range(4)] and got.keys() == want.keys(), folder
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{folder}/{name}")
  metrics = [json.loads((w / "metrics.json").read_text()) for w in (workdir, alone)]
  assert metrics[0]["num_images"] == 4 and metrics[0]["fg_fraction"] == metrics[1]["fg_fraction"]


def _pngs(folder: pathlib.Path) -> dict[str, np.ndarray]:
  return {p.name: np.array(PIL.Image.open(p)) for p in sorted(folder.glob("*.png"))}

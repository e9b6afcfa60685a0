"""Files jaxseg writes get the umask's mode (0644 under umask 022), as open() gives, not mkstemp's 0600.

The weights cache (downloads and converted params) is tested in test_models.py; the other writers here:
jaxseg._files (which experiments may share), the scikit-image photographs, and a prepared TFDS split.
"""

import contextlib
import os
import pathlib
import stat

import pytest

import fixtures
import jaxseg.data
from jaxseg import _files


@contextlib.contextmanager
def umask(mask: int):
  previous = os.umask(mask)
  try:
    yield
  finally:
    os.umask(previous)


def modes(folder: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_bytes_mode_and_content(tmp_path, mask, mode):
  target = tmp_path / "sub" / "out.json"
  with umask(mask):
    _files.atomic_write_bytes(target, b"first")
    _files.atomic_write_bytes(target, b"second")  # replacing keeps the umask's mode too
  assert target.read_bytes() == b"second"
  assert modes(tmp_path) == {"sub/out.json": mode}  # and no temp file is left


def test_atomic_write_bytes_failure_keeps_the_old_file(tmp_path, monkeypatch):
  target = tmp_path / "out.bin"
  _files.atomic_write_bytes(target, b"old")
  def interrupted(src, dst):
    raise KeyboardInterrupt
  monkeypatch.setattr(os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _files.atomic_write_bytes(target, b"new")
  assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_skimage_photos_get_the_umask_mode(tmp_path):
  with umask(0o022):
    jaxseg.data.load("skimage", None, data_dir=tmp_path)
  found = modes(tmp_path)
  assert len(found) == 6 and set(found.values()) == {0o644}, {k: oct(v) for k, v in found.items()}


def test_prepared_dataset_gets_the_umask_mode(tmp_path):
  fixtures.make_voc_devkit(tmp_path / "manual", n_train=1, n_val=1)
  with umask(0o022):
    jaxseg.data.load("voc_seg", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  found = modes(tmp_path / "data")
  assert any(name.endswith(".array_record-00000-of-00001") for name in found)
  assert set(found.values()) == {0o644}, {k: oct(v) for k, v in found.items()}

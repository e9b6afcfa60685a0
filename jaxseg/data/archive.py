"""Read-only access to files in a directory, a tar or a zip archive, by relative path."""

import os
import pathlib
import tarfile
import zipfile


class FileTree:
  """Files under a root inside a directory, tar or zip, addressed by '/'-separated paths.

  Archives are opened once and read by random access (VOC's tar is uncompressed; zip members
  are indexed), so nothing is extracted to disk.
  """

  def __init__(self, location: str | os.PathLike, root: str = ""):
    self.location = pathlib.Path(location)
    self.root = root.strip("/")
    self._tar = None
    self._zip = None
    self._members = None  # normalised name -> tar member or zip name
    if self.location.is_dir():
      return
    if zipfile.is_zipfile(self.location):
      self._zip = zipfile.ZipFile(self.location)
      self._members = {_normalise(n): n for n in self._zip.namelist() if not n.endswith("/")}
    elif tarfile.is_tarfile(self.location):
      self._tar = tarfile.open(self.location, "r:*")
      self._members = {_normalise(m.name): m for m in self._tar.getmembers() if m.isfile()}
    else:
      raise ValueError(f"{self.location} is neither a directory nor a readable tar or zip archive.")

  def describe(self, path: str) -> str:
    """Human-readable location of `path`, for error messages."""
    full = self._full(path)
    if self._members is None:
      return str(self.location / full)
    return f"{full} in {self.location}"

  def _full(self, path: str) -> str:
    return f"{self.root}/{path}" if self.root else path

  def exists(self, path: str) -> bool:
    full = self._full(path)
    if self._members is None:
      return (self.location / full).is_file()
    return full in self._members

  def read(self, path: str) -> bytes:
    """Bytes of the file at `path`; FileNotFoundError naming it if absent."""
    full = self._full(path)
    if self._members is None:
      target = self.location / full
      if not target.is_file():
        raise FileNotFoundError(f"Missing file {target}")
      return target.read_bytes()
    if full not in self._members:
      raise FileNotFoundError(f"Missing file {full} in {self.location}")
    if self._zip is not None:
      return self._zip.read(self._members[full])
    with self._tar.extractfile(self._members[full]) as handle:
      return handle.read()

  def close(self):
    for handle in (self._tar, self._zip):
      if handle is not None:
        handle.close()


def _normalise(name: str) -> str:
  while name.startswith("./"):
    name = name[2:]
  return name.lstrip("/")


def listing(path: pathlib.Path, limit: int = 12) -> str:
  """A short listing of a directory's entries, for 'wrong manual_dir' errors."""
  if not path.is_dir():
    return "(it does not exist)"
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
  if not names:
    return "(it is empty)"
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more

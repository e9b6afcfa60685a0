"""Atomic file writes with the umask's mode, shared by jaxseg.data, jaxseg.models and experiments.

tempfile.mkstemp creates files with mode 0600, which os.replace keeps: every output and cache
file would then be private whatever the umask. These helpers create the temp file with
0666 less the umask, as open() does, so replaced files get 0644 under umask 022.
"""

import os
import pathlib
import secrets
import stat


def new_temp_file(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
  """(fd, name) of a new hidden file `.<name>.<random><suffix>` next to path, mode 0666 less the umask."""
  path = pathlib.Path(path)
  while True:
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}")
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
    except FileExistsError:
      continue


def umask_mode(fd: int) -> int:
  """Permission bits of a file made by new_temp_file: 0666 less the umask, read without touching the umask."""
  return stat.S_IMODE(os.fstat(fd).st_mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes data to path (parents created) so that readers see the old file or the whole new one, never a part.

  The file gets the umask's mode (0644 under umask 022), like a file written with open().
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = new_temp_file(path)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    pathlib.Path(tmp).unlink(missing_ok=True)
    if e.filename is None:  # a failed write or fsync (a full disk) names no file: name the one being written
      raise OSError(e.errno, e.strerror, str(path)) from e
    raise
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise

"""One run per workdir: an exclusive flock on <workdir>/.lock, held for the whole run.

    with workdir_lock.hold(workdir):             # a second run stops here with a UserError
      workdir_lock.clean_stale_temp_files(workdir)
      ...

The kernel releases a flock when its holder exits, however it exits, so a SIGKILLed run leaves no
stale lock; the file is kept (removing it would let two runs lock two different files). While held
it records the holder's pid, host and start time for the refusal message. flock works across hosts
on NFS (Linux emulates it with fcntl locks there). A multi-process run shares one workdir: only
process 0 takes the lock, the others follow it at barriers.
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket

from experiments.errors import UserError

LOCK_NAME = ".lock"
_held: dict[pathlib.Path, int] = {}  # workdir -> lock file descriptor, for the workdirs this process holds


def _key(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser().resolve()


def _holder(fd: int) -> str:
  """'pid 123 on host h since 2026-...' from the lock file, or a vaguer text while the holder writes it."""
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "another run (which has not yet recorded its pid)"
  return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')})"


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates workdir if missing and checks that it is a writable directory; returns its resolved path.

  Raises:
    UserError: it is a file, or cannot be created or written.
  """
  path = _key(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir={workdir} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir={workdir} cannot be created: {e.strerror or e}") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir} is not writable")
  return path


@contextlib.contextmanager
def hold(workdir: str | os.PathLike):
  """Holds the workdir's lock for the duration of the block; creates the workdir if missing (prepare()).

  Raises:
    UserError: another process holds it (names its pid and host), or the workdir is unusable.
  """
  workdir = prepare(workdir)
  if workdir in _held:
    raise RuntimeError(f"{workdir} is already locked by this process")
  fd = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"workdir {workdir} is in use by {_holder(fd)}; wait for that run to finish or stop it, "
                      "or use another --workdir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[workdir] = fd
    try:
      yield workdir
    finally:
      del _held[workdir]
      os.ftruncate(fd, 0)  # a released lock records no holder
  finally:
    os.close(fd)  # closing the last descriptor releases the flock


def is_held(workdir: str | os.PathLike) -> bool:
  """Whether this process holds workdir's lock (inside hold())."""
  return _key(workdir) in _held


def clean_stale_temp_files(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """Removes the .*.tmp files that killed runs' atomic writes left under workdir; returns them.

  Only under the lock: without it a live run's temp files could be removed mid-write.
  """
  if not is_held(workdir):
    raise RuntimeError(f"clean_stale_temp_files({workdir}) outside workdir_lock.hold({workdir})")
  stale = sorted(pathlib.Path(workdir).rglob(".*.tmp"))
  for path in stale:
    path.unlink(missing_ok=True)
  return stale

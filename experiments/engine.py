"""The engine: runs a graph of passes over a workdir, recomputing exactly what changed.

Every pass's fingerprint is a hash of its config fields' values, of the source code it runs (Pass.code: each
file's contents, so an edit recomputes what it touches) and of its inputs' fingerprints (the source's covers
the images). workdir/manifests/<pass>.json records the fingerprint a pass's outputs were made under, its
fields, code hashes and inputs (to say what changed) and whether it completed:

    fingerprint equal, complete     reuse            the outputs are those of the current inputs
    fingerprint equal, incomplete   resume           its units carry the fingerprint: current ones are kept
      (or outputs missing)
    fingerprint changed             recompute        outputs deleted first (a kill then recomputes again)
    no manifest                     compute          nothing was made before

so a changed pass and everything downstream of it runs, and nothing else. A completed pass's manifest also
records the size and checksum of each of its files; a start checks them before it reuses the pass, and a
damaged file (truncated, overwritten) is deleted and remade alone (the pass resumes). The engine also owns the workdir
lock (for the whole run), the stale temp-file cleanup (under the lock), and the multi-host choreography:
process 0 plans and writes the manifests; per-chunk passes run on every process between barriers;
dataset-wide passes run on process 0 alone (so they must not call collectives such as ctx.params()),
and the later passes of every process read their outputs from the shared workdir.
A test hook, JAXSEG_TEST_KILL_AFTER=<pass>, SIGKILLs the process right after that pass completes.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import time
from collections.abc import Sequence
from typing import NamedTuple

from absl import logging

from experiments import common
from experiments import distributed
from experiments import workdir_lock
from experiments.passes.context import RunContext
from experiments.passes.context import digest

MANIFESTS = "manifests"
KILL_AFTER = "JAXSEG_TEST_KILL_AFTER"
ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository (or installed tree) Pass.code globs are in


def _checksum(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def code_hashes(globs: Sequence[str], root: pathlib.Path = ROOT) -> dict[str, str]:
  """{path relative to root: sha256 prefix of its bytes} of every file the globs name (a folder: its .py files).

  Raises:
    ValueError: a glob that names no file (a module renamed without its pass's declaration).
  """
  files = set()
  for pattern in globs:
    matched = [path for path in root.glob(pattern) if path.name != "__pycache__"]
    if not matched:
      raise ValueError(f"code_hashes: {pattern!r} names no file under {root}")
    for path in matched:
      files.update(path.rglob("*.py") if path.is_dir() else [path])
  return {str(path.relative_to(root)): _checksum(path) for path in sorted(files)}


class Root(NamedTuple):
  """An input that is no pass (the source): its fingerprint, and a record kept to explain a change."""
  fingerprint: str
  record: object
  explain: object  # (previous record or None) -> str, e.g. "1 added"


@contextlib.contextmanager
def session(workdir: pathlib.Path, is_main: bool):
  """Holds the workdir lock (process 0) for the whole run, after removing a killed run's temp files."""
  with workdir_lock.hold(workdir) if is_main else contextlib.nullcontext():
    if is_main:
      workdir_lock.clean_stale_temp_files(workdir)
    distributed.barrier("start")  # no process writes before the stale files are gone
    yield


def _manifest_path(ctx: RunContext, name: str) -> pathlib.Path:
  return ctx.workdir / MANIFESTS / f"{name}.json"


def _read(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def recorded_root(workdir: pathlib.Path, name: str, root: str):
  """The record of root `root` in pass `name`'s manifest (what an earlier start saw), or None."""
  return ((_read(workdir / MANIFESTS / f"{name}.json") or {}).get("records") or {}).get(root)


def _changed(now: dict, before: dict) -> list[str]:
  now = json.loads(json.dumps(now, default=str))  # as the manifest stored it: tuples are lists there
  return sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))


def _reason(previous: dict, fields: dict, code: dict, inputs: dict, roots: dict[str, Root]) -> str:
  reasons = []
  changed = _changed(fields, previous.get("fields", {}))
  if changed:
    reasons.append(f"config {', '.join(changed)} changed")
  changed = _changed(code, previous.get("code", {}))
  if changed:
    reasons.append(f"code {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed")
  for name, fingerprint in inputs.items():
    if previous.get("inputs", {}).get(name) != fingerprint:
      reasons.append(f"{name} changed" + (f": {roots[name].explain(previous.get('records', {}).get(name))}"
                                          if name in roots else ""))
  return "; ".join(reasons) or "fingerprint changed"


def _files(p, ctx: RunContext) -> list[pathlib.Path]:
  """The files a pass wrote: its units and its outputs that are files."""
  return [*p.units(ctx), *(path for path in (ctx.workdir / o for o in p.outputs) if path.is_file())]


def _name(ctx: RunContext, path: pathlib.Path) -> str:
  return str(path.relative_to(ctx.workdir)) if path.is_relative_to(ctx.workdir) else str(path)


def _record(p, ctx: RunContext) -> dict[str, list]:
  """{file: [size, checksum]} of every file of a completed pass."""
  return {_name(ctx, path): [path.stat().st_size, _checksum(path)] for path in _files(p, ctx) if path.exists()}


def _damaged(p, ctx: RunContext, recorded: dict[str, list]) -> list[pathlib.Path]:
  """The pass's files that exist but differ from their record (size first, then checksum)."""
  damaged = []
  for path in _files(p, ctx):
    size, checksum = recorded.get(_name(ctx, path), (None, None))
    if size is not None and path.exists() and (path.stat().st_size != size or _checksum(path) != checksum):
      damaged.append(path)
  return damaged


def _delete(ctx: RunContext, outputs: Sequence[str]) -> None:
  for output in outputs:
    path = ctx.workdir / output
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink(missing_ok=True)


def plan(graph, ctx: RunContext, roots: dict[str, Root]) -> dict[str, tuple[str, str]]:
  """Fingerprints every pass into ctx and decides {pass: (action, reason)}; process 0 applies the decisions.

  On process 0 a recomputed pass's outputs are deleted BEFORE its manifest is rewritten, so a kill in
  between leaves a manifest whose fingerprint differs, and the next start deletes them again.
  """
  fingerprints = {name: root.fingerprint for name, root in roots.items()}
  decisions = {}
  for p in graph:
    fields, code = p.fields(ctx), code_hashes(p.code)
    inputs = {name: fingerprints[name] for name in p.inputs}
    ctx.field_digests[p.name] = digest([p.name, fields, code])
    fingerprint = fingerprints[p.name] = ctx.fingerprints[p.name] = digest([ctx.field_digests[p.name], inputs])
    previous = _read(_manifest_path(ctx, p.name))
    same = previous is not None and previous.get("fingerprint") == fingerprint
    missing = [str(path.relative_to(ctx.workdir)) for path in [ctx.workdir / o for o in p.outputs] + p.units(ctx)
               if not path.exists()]
    damaged = _damaged(p, ctx, previous.get("files", {})) if same and previous.get("complete") else []
    if p.always:
      action, reason = "run", "always"
    elif damaged:  # deleted below, then remade alone as missing units
      action, reason = "resume", f"{', '.join(_name(ctx, d) for d in damaged[:3])}{' ...' * (len(damaged) > 3)} damaged"
      for path in damaged:
        logging.warning("pass %s: %s is damaged (its size or checksum differs from the manifest): remaking it",
                        p.name, path)
        if ctx.is_main:
          path.unlink(missing_ok=True)
    elif same and previous.get("complete") and not missing:
      action, reason = "reuse", ""
    elif same and missing:  # deleted by hand: its units are checked one by one
      action, reason = "resume", f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing"
    elif same:
      action, reason = "resume", "an earlier run stopped in it"
    elif previous is None:
      action, reason = "compute", "no previous output"
    else:
      action, reason = "recompute", _reason(previous, fields, code, inputs, roots)
    decisions[p.name] = (action, reason)
    if ctx.is_main and action != "reuse":
      if action in ("compute", "recompute") and not p.keeps_units:  # "compute": outputs of a lost manifest
        _delete(ctx, p.outputs)
        ctx.timings.pop(p.name, None)
      records = {name: roots[name].record for name in p.inputs if name in roots}
      common.save_json(_manifest_path(ctx, p.name), dict(fingerprint=fingerprint, fields=fields, code=code,
                                                         inputs=inputs, records=records, complete=False))
  return decisions


def execute(graph, ctx: RunContext, roots: dict[str, Root]) -> dict[str, tuple[str, str]]:
  """Runs the passes of `graph` (in order) that the fingerprints call for; returns the decisions."""
  timings_path = ctx.workdir / "timings.json"
  ctx.timings.update(_read(timings_path) or {})
  decisions = distributed.main_first("plan", lambda: plan(graph, ctx, roots))
  for p in graph:
    action, reason = decisions[p.name]
    logging.info("pass %s: %s%s", p.name, action, f" ({reason})" if reason else "")
  if ctx.is_main:
    common.save_json(ctx.workdir / MANIFESTS / "last_start.json", {name: list(d) for name, d in decisions.items()})
  for p in graph:
    if decisions[p.name][0] == "reuse":
      continue
    distributed.barrier(f"before {p.name}")  # the previous passes' files are visible to every process
    start = time.perf_counter()
    if p.per_chunk or ctx.is_main:  # the other processes read a dataset-wide pass's outputs from the workdir
      p.run(ctx)
    distributed.barrier(f"after {p.name}")
    if ctx.is_main:
      seconds = time.perf_counter() - start
      ctx.timings[p.name] = seconds if p.always else ctx.timings.get(p.name, 0.0) + seconds
      common.save_json(timings_path, ctx.timings)
      manifest = _read(_manifest_path(ctx, p.name))
      files = {} if p.always else _record(p, ctx)
      common.save_json(_manifest_path(ctx, p.name), {**manifest, "files": files, "complete": True})
    if os.environ.get(KILL_AFTER) == p.name:
      os.kill(os.getpid(), signal.SIGKILL)
  return decisions

"""Timing helpers shared by the benchmarks."""

import json
import subprocess
import sys
import time


def best_time(fn, *, repeat: int = 3, warmup: int = 1) -> float:
  """Returns the best wall-clock seconds of `repeat` calls of fn(), after `warmup` calls.

  fn must block until its result is ready (e.g. call .block_until_ready()).
  """
  return best_times([fn], repeat=repeat, warmup=warmup)[0]


def best_times(fns, *, repeat: int = 3, warmup: int = 1) -> list[float]:
  """Best wall-clock seconds of each of fns over `repeat` rounds, after `warmup` rounds.

  Each round calls the fns in turn, so that a slow spell of a shared machine falls on all of them alike
  (timed one after the other, single rows moved by up to 30% between runs). Each fn must block.
  """
  for _ in range(warmup):
    for fn in fns:
      fn()
  best = [float("inf")] * len(fns)
  for _ in range(repeat):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def row(name: str, jaxseg_s: float, ref_s: float, unit: str = "s", extra: str = "") -> str:
  """Formats one benchmark row: both timings and the ratio jaxseg / reference (< 1 is faster)."""
  line = f"{name:<44s} jaxseg {jaxseg_s:9.4f} {unit}  reference {ref_s:9.4f} {unit}  ratio {jaxseg_s / ref_s:6.3f}"
  if extra:
    line += "  " + extra
  print(line, flush=True)
  return line


_RESULT_MARK = "BENCHMARK_RESULT "


def run_worker(call: str, what: str, env: dict | None = None) -> dict:
  """The dict that `call` returns in a fresh subprocess (with env), e.g. run_worker("split.worker('many')", ...).

  call: an expression on a module of experiments/benchmarks (its first dotted name), returning JSON-able data.
  """
  module = call.split(".", 1)[0]
  code = (f"import json; from experiments.benchmarks import {module}; "
          f"print({_RESULT_MARK!r} + json.dumps({call}))")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
  if done.returncode != 0:
    raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
  line = next(l for l in done.stdout.splitlines() if l.startswith(_RESULT_MARK))
  return json.loads(line[len(_RESULT_MARK):])

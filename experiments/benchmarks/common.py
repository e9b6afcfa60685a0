"""Timing helpers shared by the benchmarks."""

import time


def best_time(fn, *, repeat: int = 3, warmup: int = 1) -> float:
  """Returns the best wall-clock seconds of `repeat` calls of fn(), after `warmup` calls.

  fn must block until its result is ready (e.g. call .block_until_ready()).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeat):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def row(name: str, jaxseg_s: float, ref_s: float, unit: str = "s", extra: str = "") -> str:
  """Formats one benchmark row: both timings and the ratio jaxseg / reference (< 1 is faster)."""
  line = f"{name:<44s} jaxseg {jaxseg_s:9.4f} {unit}  reference {ref_s:9.4f} {unit}  ratio {jaxseg_s / ref_s:6.3f}"
  if extra:
    line += "  " + extra
  print(line, flush=True)
  return line

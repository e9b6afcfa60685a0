"""Refinement of a VOC-like split of many image sizes, in a cold process, against pydensecrf.

The split: NUM_IMAGES rescaled crops of scikit-image photographs, each of its
own size (sides 180-500, as PASCAL VOC), and the same images in VOC's 3
commonest sizes. Fused probabilities and level scores are smooth random fields
on a 32 x 32 patch grid (448 px, patch 14); truth maps threshold another field
with a 255 border, as VOC's ignore band. Each split is refined whole by
a framework.Refiner (CRFParams defaults: VOC parameters, 10 iterations), with
framework.level_stats of each mask as the runner computes them, in
its own fresh subprocess with no persistent XLA cache, so compilation counts;
pydensecrf refines the same images from the same unaries in this process.

Rows: many sizes vs pydensecrf (seconds, cold, with the seconds spent
compiling and tracing; then the same split again in the same process, warm;
then a fresh process whose persistent XLA cache an earlier one filled, as a
rerun of segment with its default --xla_cache_dir),
many vs 3 sizes (seconds and peak RSS of the subprocess), and the number of
refinement programs the Refiner ran (each compiled once). Last rows refine LARGE_NUM_IMAGES images of as
many sizes (sides 180-500) the same way: the programs' compile cost is fixed
per split (a few seconds), so it amortises over a real split.

  python -m experiments.benchmark --only=split
"""

import os

import numpy as np

from experiments.benchmarks.common import row
from experiments.benchmarks.common import run_worker

NUM_IMAGES = 24
# A split at the scale where compiling amortises (VOC val: 1449 images, one canvas size).
LARGE_NUM_IMAGES = 120
GRID = (32, 32)
COMMON_SIZES = ((375, 500), (500, 375), (333, 500))
_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")


def sizes(kind: str, num_images: int = NUM_IMAGES, seed: int = 0) -> list[tuple[int, int]]:
  """num_images distinct (H, W) with sides in [180, 500] ('many'), or VOC's 3 commonest sizes in turn ('few')."""
  if kind == "few":
    return [COMMON_SIZES[i % len(COMMON_SIZES)] for i in range(num_images)]
  rng = np.random.default_rng(seed)
  chosen: list[tuple[int, int]] = []
  while len(chosen) < num_images:
    size = tuple(int(s) for s in rng.integers(180, 501, 2))
    if size not in chosen:
      chosen.append(size)
  return chosen


def _smooth_field(rng, shape, cells=(4, 4)) -> np.ndarray:
  import skimage.transform
  return skimage.transform.resize(rng.random(cells), shape, order=1).astype(np.float32)


def items(kind: str, num_images: int = NUM_IMAGES):
  """The split as (framework.RefineItem, level scores [3, h, w], truth [H, W]) triples (deterministic)."""
  import skimage.data
  import skimage.transform

  from jaxseg import framework
  rng = np.random.default_rng(1)
  out = []
  for i, (height, width) in enumerate(sizes(kind, num_images)):
    photo = getattr(skimage.data, _PHOTOS[i % len(_PHOTOS)])()
    photo = photo if photo.ndim == 3 else np.stack([photo] * 3, axis=-1)
    top, left = (int(rng.integers(0, max(1, s // 4))) for s in photo.shape[:2])
    image = skimage.transform.resize(photo[top:, left:, :3], (height, width), anti_aliasing=True)
    image = (image * 255).round().astype(np.uint8) if image.max() <= 1.0 else image.astype(np.uint8)
    fg_prob = _smooth_field(rng, GRID)
    scores = np.stack([np.clip(fg_prob + 0.2 * (_smooth_field(rng, GRID) - 0.5), 0, 1) for _ in range(3)])
    truth = (_smooth_field(rng, (height, width)) > 0.5).astype(np.uint8) * (1 + i % 20)
    truth[:3], truth[-3:], truth[:, :3], truth[:, -3:] = 255, 255, 255, 255
    out.append((framework.RefineItem(key=i, image=np.ascontiguousarray(image), fg_prob=fg_prob),
                scores.astype(np.float32), truth))
  return out


_COMPILE_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
                   "/jax/core/compile/jaxpr_trace_duration": "trace",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "trace"}


def worker(kind: str, num_images: int = NUM_IMAGES, batch_size: int = 1, warm: bool = True,
           cache_dir: str | None = None) -> dict:
  """Refines a split in this process (meant to be a fresh one), then (if warm) again: seconds (cold, of
  which compile and trace+lowering, and warm or None), programs, peak RSS, fg pixels. With cache_dir, the
  persistent XLA cache is on there, as segment's --xla_cache_dir sets it."""
  import resource
  import time

  import jax
  from experiments.common import use_xla_cache
  from jaxseg import framework
  if cache_dir is not None:
    use_xla_cache(cache_dir, -1)
  spent = {"compile": 0.0, "trace": 0.0}

  def listen(event, seconds, **_):
    if event in _COMPILE_EVENTS:
      spent[_COMPILE_EVENTS[event]] += seconds

  jax.monitoring.register_event_duration_secs_listener(listen)
  split = items(kind, num_images)
  refiner = framework.Refiner(framework.CRFParams(), framework.RefineOptions(batch_size=batch_size))

  def refine_with_stats() -> dict:
    masks = dict(refiner.stream(item for item, _, _ in split))
    for item, scores, truth in split:
      framework.level_stats(scores, item.fg_prob, masks[item.key], truth)
    return masks

  start = time.perf_counter()
  masks = refine_with_stats()
  seconds = time.perf_counter() - start
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  warm_seconds = None
  if warm:
    start = time.perf_counter()
    refine_with_stats()
    warm_seconds = time.perf_counter() - start
  return dict(seconds=seconds, warm_seconds=warm_seconds, programs=refiner.num_programs,
              capacities={int(k): list(v) for k, v in refiner.capacities.items()},
              compile_seconds=spent["compile"], trace_seconds=spent["trace"], peak_rss_mb=peak_rss_mb,
              fg_pixels=[int(masks[i].sum()) for i in range(len(split))])


def spawn(kind: str, num_images: int = NUM_IMAGES, batch_size: int = 1, cache_dir: str | None = None,
          warm: bool = True) -> dict:
  """worker() in a fresh subprocess with the persistent compilation cache off, or on in cache_dir (as
  segment's --xla_cache_dir sets it)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  if cache_dir is None:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return run_worker(f"split.worker({kind!r}, {num_images}, {batch_size}, {warm}, {cache_dir!r})",
                    f"split benchmark worker ({kind})", env)


def spawn_cached(kind: str, num_images: int = NUM_IMAGES) -> dict:
  """worker() in a fresh process whose persistent XLA cache a previous process filled: a rerun's cost."""
  import tempfile
  with tempfile.TemporaryDirectory(prefix="jaxseg-split-cache-") as cache_dir:
    spawn(kind, num_images, cache_dir=cache_dir, warm=False)
    return spawn(kind, num_images, cache_dir=cache_dir, warm=False)


def reference_seconds(kind: str, num_images: int = NUM_IMAGES) -> tuple[float, list[int]]:
  """pydensecrf over the same split, same unaries and parameters: seconds and refined fg pixels."""
  import time

  import jax
  from experiments.benchmarks.crf import reference_crf
  from jaxseg import framework
  crf = framework.CRFParams()
  params = dict(gaussian_sxy=crf.gaussian_sxy, gaussian_weight=crf.gaussian_weight, bilateral_sxy=crf.bilateral_sxy,
                bilateral_srgb=crf.bilateral_srgb, bilateral_weight=crf.bilateral_weight)
  unaries = []
  with jax.default_device(jax.devices("cpu")[0]):
    for item, _, _ in items(kind, num_images):
      prob = framework.upsample(item.fg_prob, item.image.shape[:2])
      unaries.append((item.image, np.asarray(framework.unary_from_prob(prob))))
  start = time.perf_counter()
  fg = [int((reference_crf(image, unary, crf.iterations, **params).argmax(-1) == 1).sum()) for image, unary in unaries]
  return time.perf_counter() - start, fg


def _versus_reference(num_images: int) -> dict:
  """Row: a cold refinement of num_images images of as many sizes vs pydensecrf on them."""
  many = spawn("many", num_images)
  ref_s, ref_fg = reference_seconds("many", num_images)
  agree = np.mean(np.abs(np.asarray(many["fg_pixels"]) - ref_fg) / np.maximum(ref_fg, 1))
  row(f"split refine {num_images} sizes vs pydensecrf (s)", many["seconds"], ref_s,
      extra=f"cold, {many['programs']} programs, capacities per canvas {many['capacities']} (compile {many['compile_seconds']:.2f} s, trace and lowering "
            f"{many['trace_seconds']:.2f} s); mean |d fg pixels| {agree:.2e}")
  row(f"split refine {num_images} sizes warm vs pydensecrf (s)", many["warm_seconds"], ref_s,
      extra="the same process again: what each further image costs")
  return many, ref_s


def run() -> None:
  (many, ref_s), few = _versus_reference(NUM_IMAGES), spawn("few")
  cached = spawn_cached("many")
  row(f"split refine {NUM_IMAGES} sizes cached vs pydensecrf (s)", cached["seconds"], ref_s,
      extra=f"a fresh process, XLA cache filled by an earlier one (a rerun); compile "
            f"{cached['compile_seconds']:.2f} s, trace and lowering {cached['trace_seconds']:.2f} s")
  row(f"split refine {NUM_IMAGES} sizes vs 3 sizes (s)", many["seconds"], few["seconds"],
      extra=f"{few['programs']} programs for 3 sizes")
  row(f"split peak RSS {NUM_IMAGES} sizes vs 3 sizes (MB)", many["peak_rss_mb"], few["peak_rss_mb"], unit="MB")
  _versus_reference(LARGE_NUM_IMAGES)


if __name__ == "__main__":
  run()

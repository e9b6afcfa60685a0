"""What a GPU machine checks in one command (under 5 minutes there), on random weights, as one table:

  python -m experiments.benchmark --only=gpu

- ViT parity: ViT-S/14 features on the default device against the same computation on the CPU;
- ViT throughput: ViT-S/14 at 448 in bfloat16, images/s, TFLOP/s (XLA's count) and MFU where the
  device's peak is known;
- dense_crf on the scikit-image photos: marginals on the device against the CPU's;
- a 24-image VOC-layout split (24 sizes) refined in a fresh process, cold then warm, and its
  foreground pixels against the same split refined on the CPU.

Without an accelerator it runs as a smoke test (smaller batch and split, device = CPU) and says so.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import crf as crf_benchmark
from experiments.benchmarks import split
from experiments.benchmarks.common import best_time
from experiments.benchmarks.common import run_worker
from jaxseg import models
from jaxseg.crf import dense_crf

VARIANT = "dinov2_vits14"
# Dense bfloat16 peak FLOP/s per device by device_kind substring (vendor datasheets; SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _peak(kind: str) -> float | None:
  return next((flops for name, flops in PEAK_BF16.items() if name in kind), None)


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _vit_rows(device, cpu, smoke: bool) -> list[tuple[str, str, str]]:
  cfg = models.VARIANTS[VARIANT]
  params = models.init_params(cfg, jax.random.key(0))
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  encode = jax.jit(models.encode, static_argnames=("cfg", "dtype", "return_blocks"))
  on_device = encode(jax.device_put(params, device), jax.device_put(images, device), cfg).patch_tokens
  on_cpu = encode(jax.device_put(params, cpu), jax.device_put(images, cpu), cfg).patch_tokens
  diff = float(jnp.max(jnp.abs(jax.device_put(on_device, cpu) - on_cpu)))
  rows = [("vit parity, float32 224 batch 2", f"max |device - cpu| {diff:.2e}",
           "ok" if diff < 2e-2 else "MISMATCH")]

  batch, size = (2, 224) if smoke else (64, 448)
  params = jax.device_put(params, device)
  batch_images = jax.device_put(jnp.zeros((batch, size, size, 3), jnp.float32), device)
  compiled = jax.jit(lambda p, x: models.encode(p, x, cfg, dtype=jnp.bfloat16).patch_tokens).lower(
      params, batch_images).compile()
  seconds = best_time(lambda: compiled(params, batch_images).block_until_ready(), repeat=5, warmup=2)
  flops = _flops(compiled)
  peak = _peak(device.device_kind)
  achieved = flops / seconds if flops else None
  mfu = f"MFU {100 * achieved / peak:.1f}%" if achieved and peak else "MFU n/a (peak unknown)"
  rows.append((f"vit throughput, bfloat16 {size} batch {batch}",
               f"{batch / seconds:.1f} images/s, " + (f"{achieved / 1e12:.3g} TFLOP/s" if achieved else "FLOPs n/a"),
               mfu))
  return rows


def _crf_rows(device, cpu) -> list[tuple[str, str, str]]:
  rows = []
  crf = jax.jit(lambda image, unary: dense_crf(image, unary, **crf_benchmark.PARAMS["voc"],
                                               iterations=crf_benchmark.ITERATIONS))
  for name, image in crf_benchmark._images().items():  # pylint: disable=protected-access
    unary = crf_benchmark._unary(image.shape[0], image.shape[1], 2)  # pylint: disable=protected-access
    q_device = np.asarray(crf(jax.device_put(image, device), jax.device_put(unary, device)))
    q_cpu = np.asarray(crf(jax.device_put(image, cpu), jax.device_put(unary, cpu)))
    agree = float(np.mean(q_device.argmax(-1) == q_cpu.argmax(-1)))
    diff = float(np.abs(q_device - q_cpu).max())
    rows.append((f"dense_crf {name}, 2 labels", f"max |dQ| {diff:.2e}, labels agree {100 * agree:.3f}%",
                 "ok" if agree > 0.999 else "MISMATCH"))
  return rows


def _split_rows(smoke: bool) -> list[tuple[str, str, str]]:
  num_images = 4 if smoke else split.NUM_IMAGES
  result = split.spawn("many", num_images)
  row = (f"split, {num_images} images of {num_images} sizes",
         f"cold {result['seconds']:.1f} s (compile {result['compile_seconds']:.1f} s), "
         f"warm {result['warm_seconds']:.2f} s, {result['programs']} programs")
  if smoke:
    return [row + ("device is the CPU",)]
  on_cpu = run_worker(f"split.worker('many', {num_images}, warm=False)", "split on the cpu",
                      dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false"))
  same = result["fg_pixels"] == on_cpu["fg_pixels"]
  close = np.abs(np.subtract(result["fg_pixels"], on_cpu["fg_pixels"])).max()
  return [row + ("fg pixels = cpu" if same else f"fg pixels differ from cpu by up to {close}",)]


def run() -> None:
  device, cpu = jax.devices()[0], jax.devices("cpu")[0]
  smoke = device.platform == "cpu"
  print(f"device: {device.device_kind} ({device.platform})" + (
      "; no accelerator: a smoke run (smaller batch and split), device = CPU" if smoke else ""), flush=True)
  rows = _vit_rows(device, cpu, smoke) + _crf_rows(device, cpu) + _split_rows(smoke)
  width = max(len(name) for name, _, _ in rows)
  value_width = max(len(value) for _, value, _ in rows)
  print(f"{'check':<{width}s}  {'result':<{value_width}s}  verdict")
  for name, value, verdict in rows:
    print(f"{name:<{width}s}  {value:<{value_width}s}  {verdict}", flush=True)

"""Data parallelism: ViT and k-means throughput on 1, 2 and 4 devices, against the same code on one device.

Each device count runs in its own subprocess: forced host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, JAX_PLATFORMS=cpu), and,
when JAX sees an accelerator, every real device. Inputs are padded to a
multiple of the devices and sharded on the batch axis (jaxseg.parallel), as the
segment runner does. Rows give seconds per call with N devices (jaxseg) and
with 1 device of the same kind (reference), images/s or points/s, and the
speed-up. Host devices share the same CPU cores, so they show the overhead of
sharding rather than a speed-up; real devices show the scaling. k-means rows:
Lloyd's iterations from given centroids, and k-means++ then Lloyd (its cumsum
over split points is quadratic under GSPMD: the runner keeps that k-means whole).

  python -m experiments.benchmark --only=scale
"""

import os
import subprocess
import sys

from experiments.benchmarks.common import row
from experiments.benchmarks.common import run_worker

HOST_DEVICE_COUNTS = (1, 2, 4)
# (batch of images, image side, k-means points); accelerators get a batch per device.
_CPU_SIZES = dict(batch=8, side=224, points=100_000)
_ACCELERATOR_SIZES = dict(batch=32, side=448, points=1_000_000)


def worker(num_devices: int, batch: int, side: int, points: int, per_device: bool) -> dict:
  """Times one sharded ViT batch and one sharded k-means on the first num_devices devices (in this process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from experiments.benchmarks.common import best_time
  from jaxseg import models
  from jaxseg import parallel
  from jaxseg.cluster import kmeans

  mesh = parallel.batch_mesh(jax.devices()[:num_devices])
  on_mesh = lambda tree: parallel.shard_batch(parallel.pad_batch(tree, mesh.size), mesh)
  rng = np.random.default_rng(0)
  cfg = models.VARIANTS["dinov2_vits14"]
  params = parallel.replicate(models.init_params(cfg, jax.random.key(0)), mesh)
  batch = batch * num_devices if per_device else batch
  images = on_mesh(rng.normal(size=(batch, side, side, 3)).astype(np.float32))
  encode = jax.jit(models.encode, static_argnames=("cfg", "dtype", "return_blocks"))
  vit_s = best_time(lambda: encode(params, images, cfg).k.block_until_ready(), repeat=3, warmup=1)

  centers = rng.normal(size=(20, 384))
  x = centers[rng.integers(20, size=points)] + 2.0 * rng.normal(size=(points, 384))
  init = parallel.replicate(jnp.asarray(x[:20], jnp.float32), mesh)
  x, mask = on_mesh((x.astype(np.float32), np.ones(points, bool)))
  cluster = lambda init: kmeans(x, 20, key=jax.random.key(0), mask=mask, n_init=1, max_iter=20, tol=0.0,
                                metric="cosine", init=init).centroids.block_until_ready()
  lloyd_s = best_time(lambda: cluster(init), repeat=3, warmup=1)
  kmeans_s = best_time(lambda: cluster(None), repeat=1, warmup=1)
  return dict(devices=mesh.size, platform=jax.default_backend(), batch=batch, side=side, points=points,
              vit_s=vit_s, lloyd_s=lloyd_s, kmeans_s=kmeans_s)


def _spawn(num_devices: int, env: dict, sizes: dict, per_device: bool) -> dict:
  return run_worker(f"scale.worker({num_devices}, **{sizes!r}, per_device={per_device})",
                    f"scale benchmark worker ({num_devices} devices)", env)


def _rows(results: list[dict], kind: str) -> None:
  one = results[0]
  for r in results:
    name = f"{kind} x{r['devices']}"
    row(f"scale vit {name} batch {r['batch']} {r['side']}px (s)", r["vit_s"], one["vit_s"],
        extra=f"images/s {r['batch'] / r['vit_s']:.2f} (1 device {one['batch'] / one['vit_s']:.2f})")
    for step, key in (("lloyd", "lloyd_s"), ("k-means++ and lloyd", "kmeans_s")):
      row(f"scale {step} {name} k=20 {r['points']}x384 (s)", r[key], one[key],
          extra=f"points/s {r['points'] / r[key]:.3g} (1 device {one['points'] / one[key]:.3g})")


def run() -> None:
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  host = [_spawn(n, dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}"),
                 _CPU_SIZES, per_device=False) for n in HOST_DEVICE_COUNTS]
  _rows(host, "host devices")
  probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend(), jax.device_count())"],
                         env=base, capture_output=True, text=True, timeout=600)
  backend, count = (probe.stdout.split() + ["cpu", "1"])[:2] if probe.returncode == 0 else ("cpu", "1")
  if backend != "cpu":
    counts = sorted({1, *(n for n in (2, 4, 8) if n < int(count)), int(count)})
    _rows([_spawn(n, base, _ACCELERATOR_SIZES, per_device=True) for n in counts], f"{backend} devices")

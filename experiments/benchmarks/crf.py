"""Dense CRF: jaxseg.crf.dense_crf (jitted, warm) against pydensecrf, 10 mean-field iterations.

Images are skimage's astronaut (512x512) and coffee resized to 500x375; unaries
are smooth random probabilities. Both parameter sets: pydensecrf's common
defaults and the VOC set used by jaxseg's refinement stage. The Gaussian
lattice is built once per size (crf.gaussian_lattice, passed as
dense_crf(..., gaussian=)), as a loop over images of one size does; the extra
column times dense_crf building it on every call. Each row takes the best of
ROUNDS rounds, each of which runs all three in turn. The last rows time
a first call of dense_crf at a new image size (trace, compile and run): it
compiles per (H, W); the refinement stage packs images into canvases of a few
pixel counts instead (see the split benchmark).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import best_time, best_times, row
from jaxseg.crf import dense_crf, gaussian_lattice

PARAMS = {
    "default": dict(gaussian_sxy=3.0, gaussian_weight=3.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
                    bilateral_weight=10.0),
    "voc": dict(gaussian_sxy=1.0, gaussian_weight=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                bilateral_weight=4.0),
}
ITERATIONS = 10
ROUNDS = 7  # interleaved rounds per row (jaxseg, jaxseg building its Gaussian lattice, pydensecrf), best of each


def _images():
  import skimage.data
  import skimage.transform
  coffee = skimage.transform.resize(skimage.data.coffee(), (375, 500), anti_aliasing=True)
  return {"500x375": (coffee * 255).round().astype(np.uint8), "512x512": skimage.data.astronaut()}


def _unary(height: int, width: int, num_labels: int) -> np.ndarray:
  import skimage.transform
  rng = np.random.default_rng(0)
  coarse = rng.random((height // 16 + 1, width // 16 + 1, num_labels))
  prob = skimage.transform.resize(coarse, (height, width), order=1) + 0.05
  prob /= prob.sum(-1, keepdims=True)
  return -np.log(prob).astype(np.float32)


def reference_crf(image: np.ndarray, unary: np.ndarray, iterations: int = ITERATIONS, *,
                  gaussian_sxy: float, gaussian_weight: float, bilateral_sxy: float,
                  bilateral_srgb: float, bilateral_weight: float) -> np.ndarray:
  """pydensecrf's DenseCRF2D: image [H, W, 3] uint8, unary [H, W, L] float32 -> Q [H, W, L] float32."""
  import pydensecrf.densecrf as dcrf
  height, width, num_labels = unary.shape
  crf = dcrf.DenseCRF2D(width, height, num_labels)
  crf.setUnaryEnergy(np.ascontiguousarray(unary.transpose(2, 0, 1).reshape(num_labels, -1)))
  crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_weight)
  crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image),
                           compat=bilateral_weight)
  q = np.array(crf.inference(iterations), np.float32)
  return q.reshape(num_labels, height, width).transpose(1, 2, 0)


_GAUSSIAN = jax.jit(gaussian_lattice, static_argnums=(0, 1, 2))


def run():
  for size, image in _images().items():
    height, width = image.shape[:2]
    for num_labels in (2, 21):
      unary = _unary(height, width, num_labels)
      for name, params in PARAMS.items():
        crf = jax.jit(functools.partial(dense_crf, iterations=ITERATIONS, **params))
        image_d, unary_d = jnp.asarray(image), jnp.asarray(unary)
        # The Gaussian lattice depends on the size alone: a loop over images of one size builds it once.
        gaussian = _GAUSSIAN(height, width, params["gaussian_sxy"])
        jaxseg_s, per_call_s, ref_s = best_times(
            [lambda: crf(image_d, unary_d, gaussian=gaussian).block_until_ready(),
             lambda: crf(image_d, unary_d).block_until_ready(),
             lambda: reference_crf(image, unary, ITERATIONS, **params)], repeat=ROUNDS)
        agree = np.mean(np.asarray(crf(image_d, unary_d, gaussian=gaussian)).argmax(-1)
                        == reference_crf(image, unary, ITERATIONS, **params).argmax(-1))
        row(f"crf {size} L={num_labels} {name}", jaxseg_s, ref_s,
            extra=f"argmax agree {agree:.4f}; Gaussian lattice built per call {per_call_s:.4f} s")
  _first_call_rows()


def _first_call_rows():
  """First call at new sizes (crops of the 500x375 image, 2 labels, VOC parameters): compile + run."""
  params = PARAMS["voc"]
  crf = jax.jit(functools.partial(dense_crf, iterations=ITERATIONS, **params))
  image = _images()["500x375"]
  for height, width, label in ((300, 400, "new size"), (301, 400, "another new size")):
    crop, unary = np.ascontiguousarray(image[:height, :width]), _unary(height, width, 2)
    start = time.perf_counter()
    crf(crop, unary).block_until_ready()
    first_s = time.perf_counter() - start
    warm_s = best_time(lambda: crf(crop, unary).block_until_ready(), repeat=3, warmup=0)
    ref_s = best_time(lambda: reference_crf(crop, unary, ITERATIONS, **params), repeat=3, warmup=1)
    row(f"crf 1st call {height}x{width} L=2 voc {label}", first_s, ref_s,
        extra=f"compile {first_s - warm_s:.2f} s, warm {warm_s:.4f} s")


if __name__ == "__main__":
  run()

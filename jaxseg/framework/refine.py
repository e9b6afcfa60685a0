"""Stage 5: upsample the patch probability to the image's own resolution and refine it with a dense CRF.

One image at a time, at its own size: jit caches one program per (H, W) (and
patch grid), so a split with many distinct image sizes compiles once per size.
"""

import functools

import jax
import jax.numpy as jnp

from jaxseg.crf import dense_crf
from jaxseg.framework.config import CRFConfig

UNARY_EPS = 1e-5  # keeps -log finite; as pydensecrf's unary_from_softmax clips


def upsample(prob: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear upsampling of a patch-grid map to (H, W).

  The ViT saw the whole image resized to S x S, so the h x w grid spans the
  whole original image; patch centres sit at half-pixel offsets (no corner
  alignment), as jax.image.resize assumes.

  Args:
    prob: [h, w] float.
    size: (H, W).

  Returns:
    [H, W] float32.
  """
  return jax.image.resize(jnp.asarray(prob, jnp.float32), tuple(size), method="linear")


def unary_from_prob(fg_prob: jax.Array) -> jax.Array:
  """[..., 2] float32 CRF unary (negative log probability) of (background, foreground) from fg_prob: [...]."""
  p = jnp.clip(jnp.asarray(fg_prob, jnp.float32), UNARY_EPS, 1.0 - UNARY_EPS)
  return -jnp.log(jnp.stack([1.0 - p, p], axis=-1))


def downscaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
  """(H, W) scaled so that the longer side is at most max_side (unchanged if it already is, or max_side is 0)."""
  height, width = size
  if not max_side or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def nearest_resize(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[H, W] nearest-neighbour resize of mask [h, w] (pixel centres, no corner alignment)."""
  rows = jnp.minimum(((jnp.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(jnp.int32), mask.shape[0] - 1)
  cols = jnp.minimum(((jnp.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(jnp.int32), mask.shape[1] - 1)
  return mask[rows[:, None], cols[None, :]]


@functools.partial(jax.jit, static_argnames=("crf",))
def refine(image: jax.Array, fg_prob: jax.Array, crf: CRFConfig = CRFConfig()) -> jax.Array:
  """Foreground mask of one image at its own resolution.

  Args:
    image: [H, W, 3] uint8 RGB at the original resolution.
    fg_prob: [h, w] fused foreground probability on the patch grid.
    crf: CRF parameters (static); iterations = 0 thresholds the upsampled
      probability at 0.5 instead; images larger than crf.max_side are refined
      at a downscaled copy (see CRFConfig).

  Returns:
    [H, W] bool.
  """
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"refine: image must be [H, W, 3] RGB, got shape {image.shape}")
  size = image.shape[:2]
  work_size = downscaled_size(size, crf.max_side)
  if work_size != size:
    image = jax.image.resize(image.astype(jnp.float32), (*work_size, 3), method="linear", antialias=True)
    image = jnp.clip(jnp.round(image), 0, 255).astype(jnp.uint8)
  prob = upsample(fg_prob, work_size)
  if crf.iterations == 0:
    mask = prob > 0.5
  else:
    q = dense_crf(image, unary_from_prob(prob), iterations=crf.iterations, gaussian_sxy=crf.gaussian_sxy,
                  gaussian_weight=crf.gaussian_weight, bilateral_sxy=crf.bilateral_sxy,
                  bilateral_srgb=crf.bilateral_srgb, bilateral_weight=crf.bilateral_weight)
    mask = jnp.argmax(q, axis=-1) == 1
  return mask if work_size == size else nearest_resize(mask, size)

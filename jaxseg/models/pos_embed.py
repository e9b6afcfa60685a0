"""Position-embedding resizing that matches PyTorch's bicubic interpolation exactly.

jax.image's bicubic uses Keys' a = -0.5 and no border clamping; PyTorch's (used by every
reference) uses a = -0.75 with clamped borders, and a = -0.5 with a widened, renormalised
window when antialiasing. Both are separable, so each is a small [out, in] matrix built with
numpy at trace time (sizes are static) and applied with two matrix products.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.models.config import POS_INTERP_MODES


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x) with parameter a, zero outside |x| < 2."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
  """torch.nn.functional.interpolate(mode="bicubic", align_corners=False) along one axis.

  Args:
    in_size: input length.
    out_size: output length.
    scale: the `scale_factor` handed to torch (source step is 1 / scale); None when torch is
      given the output size (source step in_size / out_size).

  Returns:
    [out_size, in_size] float32 matrix whose rows hold the four clamped-border tap weights.
  """
  # torch computes the source step in float32 from a double 1 / scale_factor.
  step = np.float32(1.0 / scale) if scale is not None else np.float32(in_size) / np.float32(out_size)
  # One rounding of step * (i + 0.5) - 0.5, as torch's fused multiply-add gives.
  source = (np.float64(step) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
  floor = np.floor(source)
  frac = source - floor
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  for tap in range(4):
    index = np.clip(floor.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (rows, index), _keys_cubic(frac + np.float32(1 - tap), np.float32(-0.75)))
  return matrix


@functools.lru_cache(maxsize=256)
def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch's interpolate(mode="bicubic", antialias=True, align_corners=False, size=...) along one axis.

  Returns:
    [out_size, in_size] float32 matrix: a = -0.5 kernel stretched by the downscale factor,
    truncated at the borders and renormalised to sum 1 per row (PIL's resampling).
  """
  # torch evaluates these in float32; mirroring that keeps the result within float32 rounding.
  f32 = np.float32
  step = f32(in_size) / f32(out_size)
  support = f32(2) * step if step >= 1 else f32(2)
  inv_step = f32(1) / step if step >= 1 else f32(1)
  matrix = np.zeros((out_size, in_size), np.float32)
  for row in range(out_size):
    center = step * (f32(row) + f32(0.5))
    lo = max(int(center - support + f32(0.5)), 0)
    hi = min(int(center + support + f32(0.5)), in_size)
    weights = _keys_cubic((np.arange(lo, hi, dtype=f32) - center + f32(0.5)) * inv_step, f32(-0.5))
    total = weights.sum(dtype=f32)
    matrix[row, lo:hi] = weights / total if total != 0 else weights
  return matrix


def interpolate_pos_embed(pos_embed: jax.Array, size: tuple[int, int], mode: str) -> jax.Array:
  """Resizes the patch position embeddings of a square pretraining grid to an h x w patch grid.

  Args:
    pos_embed: [M * M, D] patch entries of the embedding (no CLS entry), row-major over the grid.
    size: (h, w) target grid in patches.
    mode: "meta": facebookresearch DINO and DINOv2 without registers (bicubic with scale
      factors ((h + 0.1) / M, (w + 0.1) / M)); "hf": transformers Dinov2Model / ViTModel
      (bicubic to size (h, w)); "hf_antialias": facebookresearch DINOv2 with registers and
      transformers Dinov2WithRegistersModel (antialiased bicubic to size (h, w)).
      In every mode, as in the references, an M x M target returns pos_embed unchanged.

  Returns:
    [h * w, D] with pos_embed's dtype; the resize itself runs in float32 like the references.
  """
  if mode not in POS_INTERP_MODES:
    raise ValueError(f"interpolate_pos_embed: mode must be one of {POS_INTERP_MODES}, got {mode!r}.")
  num_pos, dim = pos_embed.shape
  grid = int(round(num_pos ** 0.5))
  if grid * grid != num_pos:
    raise ValueError(f"interpolate_pos_embed: pos_embed has {num_pos} entries, not a square grid.")
  h, w = size
  if (h, w) == (grid, grid):
    return pos_embed
  if mode == "meta":
    rows = bicubic_matrix(grid, h, (h + 0.1) / grid)
    cols = bicubic_matrix(grid, w, (w + 0.1) / grid)
  elif mode == "hf":
    rows, cols = bicubic_matrix(grid, h), bicubic_matrix(grid, w)
  else:
    rows, cols = bicubic_antialias_matrix(grid, h), bicubic_antialias_matrix(grid, w)
  table = pos_embed.astype(jnp.float32).reshape(grid, grid, dim)
  out = jnp.einsum("hm,mnd,wn->hwd", rows, table, cols, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(h * w, dim).astype(pos_embed.dtype)

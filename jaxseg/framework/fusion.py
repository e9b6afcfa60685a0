"""Stage 4: soft scores per level and their fusion into one foreground probability per patch."""

import functools

import jax
import jax.numpy as jnp

from jaxseg.framework.config import FUSIONS


def level_scores(margins: jax.Array, valid: jax.Array, temperature: float) -> jax.Array:
  """Soft foreground score sigmoid(margin / temperature) in [0, 1]; 0 where not valid.

  Args:
    margins: [L, ...] cosine margins (> 0 = foreground).
    valid: [...] bool.
    temperature: > 0.

  Returns:
    [L, ...] float32; > 0.5 exactly where the margin is > 0.
  """
  return jnp.where(valid, jax.nn.sigmoid(margins / temperature), 0.0)


@functools.partial(jax.jit, static_argnames=("fusion",))
def fuse(scores: jax.Array, fusion: str) -> jax.Array:
  """Fused foreground probability, whose > 0.5 set is the fused mask.

  "vote": the (L // 2 + 1)-th largest score (the median for 3 levels), > 0.5
  iff a strict majority of levels says foreground. "intersection": the
  minimum, > 0.5 iff every level does. "mean": the mean score.

  Args:
    scores: [L, ...] per-level scores in [0, 1].
    fusion: "vote", "intersection" or "mean".

  Returns:
    [...] float32 in [0, 1].
  """
  if fusion == "vote":
    return jnp.sort(scores, axis=0)[(scores.shape[0] - 1) // 2]
  if fusion == "intersection":
    return jnp.min(scores, axis=0)
  if fusion == "mean":
    return jnp.mean(scores, axis=0)
  raise ValueError(f"fuse: fusion={fusion!r}, expected one of {FUSIONS}")

"""Stage 0: the per-image features the method clusters, taken from a ViT's output."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxseg.framework.config import FEATURES

_EPS = 1e-12
METRIC = "cosine"  # every k-means of the method: features are unit length, so spherical k-means


class PatchFeatures(NamedTuple):
  """What the method keeps of one batch of images (cache these, e.g. as float16).

  Attributes:
    patches: [B, h, w, D] float32, unit length; zero where not valid.
    cls: [B, D] float32 CLS tokens, unit length.
    attention: [B, h, w] float32 CLS-to-patch attention of the last block, mean over heads.
    valid: [B, h, w] bool; False marks padding (a padded image is all False).
  """
  patches: jax.Array
  cls: jax.Array
  attention: jax.Array
  valid: jax.Array


def unit_length(x: jax.Array) -> jax.Array:
  """Scales x: [..., D] to unit length along the last axis; all-zero vectors stay zero."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def patch_features(vit_output: Any, feature: str, valid: jax.Array | None = None) -> PatchFeatures:
  """Selects and normalises the clustered features of a batch (jittable; feature is static).

  Args:
    vit_output: a jaxseg.models ViTOutput: cls [B, D], patch_tokens, q, k, v
      [B, h, w, D], cls_attention [B, heads, h, w].
    feature: "q", "k", "v" or "tokens" (patch_tokens).
    valid: [B, h, w] or [B] bool (per image); None = everything valid.

  Returns:
    PatchFeatures with invalid patches zeroed.
  """
  if feature not in FEATURES:
    raise ValueError(f"patch_features: feature={feature!r}, expected one of {FEATURES}")
  chosen = vit_output.patch_tokens if feature == "tokens" else getattr(vit_output, feature)
  batch, h, w, _ = chosen.shape
  if valid is None:
    valid = jnp.ones((batch, h, w), bool)
  valid = jnp.asarray(valid, bool)
  if valid.ndim == 1:
    valid = jnp.broadcast_to(valid[:, None, None], (batch, h, w))
  if valid.shape != (batch, h, w):
    raise ValueError(f"patch_features: valid must be [B, h, w] = {(batch, h, w)} or [B], got {valid.shape}")
  patches = jnp.where(valid[..., None], unit_length(chosen), 0.0)
  attention = jnp.where(valid, jnp.mean(jnp.asarray(vit_output.cls_attention, jnp.float32), axis=1), 0.0)
  return PatchFeatures(patches, unit_length(vit_output.cls), attention, valid)


def border_patches(valid: jax.Array) -> jax.Array:
  """[B, h, w] bool: valid patches with a 4-neighbour that is invalid or off the grid.

  Without padding this is the outer ring of the patch grid; with letterboxing,
  the ring of the valid area.
  """
  padded = jnp.pad(valid, ((0, 0), (1, 1), (1, 1)), constant_values=False)
  interior = (padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
  return valid & ~interior

"""Stage 0, the features pass: the ViT once per image, cached per chunk of batch_size images.

    features/NNNNNN.npz   unit patch features (float16), CLS, CLS attention, valid, index, size, id
                          (+ patch tokens for "pooled" descriptors), stamped per chunk

A chunk's fingerprint covers only the model, the feature kind and its own images, so adding or replacing
an image recomputes only the chunks whose images changed (or moved).
"""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import jaxseg.data
from experiments.passes.context import RunContext
from jaxseg import framework
from jaxseg import models
from jaxseg import parallel

NAME = "features"


def fields(ctx: RunContext) -> dict:
  config = ctx.config
  values = {"image_size": config.image_size, "batch_size": config.batch_size, "model.variant": config.model.variant,
            "model.weights": config.model.weights, "model.dtype": config.model.dtype,
            "method.feature": ctx.method.feature, "keep_tokens": keep_tokens(ctx)}
  # The architecture as resolved (e.g. how position embeddings are resized), not only its name.
  values["model.architecture"] = dataclasses.asdict(models.get_variant(config.model.variant))
  if config.model.weights == "random":
    values["seed"] = config.seed  # the weights' init key
  elif pathlib.Path(config.model.weights).expanduser().is_file():  # a local file replaced at the same path
    stat = pathlib.Path(config.model.weights).expanduser().stat()
    values["model.weights_file"] = [stat.st_size, stat.st_mtime_ns]
  return values


def keep_tokens(ctx: RunContext) -> bool:
  """Whether the chunks keep the patch tokens ("pooled" descriptors are means of them)."""
  return ctx.method.descriptor == "pooled"


@functools.partial(jax.jit, static_argnames=("vit", "feature", "dtype", "keep_tokens"))
def _encode_batch(params, images, valid, *, vit, feature, dtype, keep_tokens):
  out = models.encode(params, images, vit, dtype=dtype)
  features = framework.patch_features(out, feature, valid)
  tokens = out.patch_tokens.astype(jnp.float16) if keep_tokens else None
  return features, tokens


def run(ctx: RunContext) -> None:
  if ctx.is_main:  # chunks past the end of a split that shrank
    for path in (ctx.workdir / NAME).glob("*.npz"):
      if path.stem.isdigit() and int(path.stem) >= ctx.num_chunks:
        path.unlink()
  todo = ctx.todo(NAME, NAME)
  params = ctx.params()
  if not todo:
    return
  dtype = jnp.dtype(ctx.config.model.dtype)
  tokens_kept = keep_tokens(ctx)
  batches = jaxseg.data.batches(ctx.source, batch_size=ctx.config.batch_size, image_size=ctx.config.image_size,
                                patch_size=ctx.vit.patch_size, indices=np.concatenate([ctx.chunk(c) for c in todo]),
                                mean=ctx.vit.mean, std=ctx.vit.std)
  # tqdm outside the zip: zip stops at todo's end before asking the bar for its last step
  for c, batch in tqdm.tqdm(zip(todo, batches), total=len(todo), desc=NAME, unit="batch"):
    images, valid = ctx.on_devices((batch["image"], batch["valid"]))
    features, tokens = _encode_batch(params, images, valid, vit=ctx.vit, feature=ctx.method.feature,
                                     dtype=dtype, keep_tokens=tokens_kept)
    # Only the chunk's own rows are cached: the cache does not depend on the number of devices.
    features, tokens = jax.tree.map(lambda a: a[:len(batch["valid"])], parallel.to_host((features, tokens)))
    arrays = dict(patches=features.patches.astype(np.float16), cls=features.cls, attention=features.attention,
                  valid=features.valid, index=batch["index"], size=batch["size"], id=np.asarray(batch["id"]))
    if tokens_kept:
      arrays["tokens"] = tokens
    ctx.save_npz(NAME, ctx.path(NAME, c), c, **arrays)

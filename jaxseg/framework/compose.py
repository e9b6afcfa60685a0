"""Stages 1-4 composed once: the pass functions the segment runner streams over its feature cache, and
`segment_features`, the same functions over a split held in memory, with the same PRNG keys and sample budgets.

    features = PatchFeatures(patches, cls, attention, valid)     # a whole small split
    result = segment_features(features, cfg, key=jax.random.key(seed), batch_size=8)  # = the runner's levels
    masks = [refine(image, p, cfg.crf) for image, p in zip(images, result.fg_prob)]   # stage 5
    labels = label_pooled(features.patches, masks, cfg, key=key)  # stage 6, "pooled" descriptors

A pass function takes `batches`, a callable returning a fresh iterator of (first, PatchFeatures), first
being the split position of the batch's first image: a pass may stream the split twice. Sampling is keyed
per image position (levels.patch_ids), never per batch, so any batch size or device count gives the same
levels (the runner's chunk c starts at c * batch_size).
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.cluster.stream import ReservoirState
from jaxseg.cluster.stream import reservoir_add_donated
from jaxseg.cluster.stream import reservoir_init
from jaxseg.framework import labeling
from jaxseg.framework import levels
from jaxseg.framework.config import MethodConfig
from jaxseg.framework.features import PatchFeatures
from jaxseg.framework.fusion import fuse
from jaxseg.framework.fusion import level_scores

Batches = Callable[[], Iterable[tuple[int, PatchFeatures]]]

# fold_in(run key, n) per seed-dependent pass: the runner and segment_features derive the same keys.
PASS_KEYS = {"dataset_level": 1, "category_level": 2, "classes": 6}


def pass_key(key: jax.Array, name: str) -> jax.Array:
  """The PRNG key of pass `name` (one of PASS_KEYS) of a run whose key is `key`."""
  return jax.random.fold_in(key, PASS_KEYS[name])


class MultilevelResult(NamedTuple):
  """Stages 1-4 over a split of N images.

  Attributes:
    dataset: stage 1 (centroids [k, D], foreground [k], prototypes [2, D]).
    category_centroids: [C, D] CLS-token centroids.
    category_prototypes: [C, 2, D] (bg, fg) per category.
    categories: [N] int32 category of each image.
    image_prototypes: [N, 2, D] (bg, fg) per image.
    level_scores: [3, N, h, w] soft scores of the dataset, category, image levels.
    fg_prob: [N, h, w] fused foreground probability.
    level_masks: [3, N, h, w] bool, level_scores > 0.5.
    fg_mask: [N, h, w] bool fused mask, fg_prob > 0.5.
  """
  dataset: levels.DatasetLevel
  category_centroids: jax.Array
  category_prototypes: jax.Array
  categories: jax.Array
  image_prototypes: jax.Array
  level_scores: jax.Array
  fg_prob: jax.Array
  level_masks: jax.Array
  fg_mask: jax.Array


def effective_method(cfg: MethodConfig, num_images: int) -> MethodConfig:
  """cfg with num_categories reduced to num_images when the split has fewer images (one per category)."""
  return dataclasses.replace(cfg, num_categories=max(1, min(cfg.num_categories, num_images)))


def capped_budget(cfg: MethodConfig, num_patches: int, per: int = 1) -> int:
  """The sample budget capped so that each of `per` reservoirs holds at most every patch of the split.

  A reservoir at least as large as the stream keeps all of it, so a larger one only costs memory
  (the default 1M x 384 is 1.5 GB whatever the split's size).
  """
  return min(cfg.sample_budget, per * num_patches)


def _flat(features: PatchFeatures) -> tuple[jax.Array, jax.Array]:
  return features.patches.reshape(-1, features.patches.shape[-1]), features.valid.reshape(-1)


_sample_category_patches_donated = jax.jit(levels.sample_category_patches.__wrapped__, donate_argnames="samples")


def fit_dataset_level(batches: Batches, cfg: MethodConfig, *, key: jax.Array, num_patches: int,
                      place: Callable[[ReservoirState], ReservoirState] = lambda s: s,
                      ) -> tuple[levels.DatasetLevel, levels.ClusterStats]:
  """Stage 1 over a split streamed twice (sample, then assign).

  Args:
    batches: the split's batches (see the module docstring).
    cfg: method config.
    key: the dataset level's key, pass_key(run key, "dataset_level").
    num_patches: N * h * w of the split (caps the reservoir).
    place: puts the reservoir where the k-means runs (the runner replicates it over its devices).

  Returns:
    (DatasetLevel, the split's summed ClusterStats).
  """
  sample_key, fit_key = jax.random.split(key)
  sample = None
  for first, features in batches():
    if sample is None:
      sample = reservoir_init(capped_budget(cfg, num_patches), features.patches.shape[-1])
    x, valid = _flat(features)
    sample = reservoir_add_donated(sample, x, key=sample_key, mask=valid, ids=levels.patch_ids(features, first))
  centroids = levels.fit_dataset_centroids(place(sample), cfg, key=fit_key)
  stats = None
  for _, features in batches():
    stats = levels.accumulate_stats(stats, levels.dataset_cluster_stats(features, centroids))
  return levels.dataset_level(centroids, stats, cfg.fg_prior), stats


def fit_category_level(cls: jax.Array, batches: Batches, dataset: levels.DatasetLevel, cfg: MethodConfig, *,
                       key: jax.Array, num_patches: int) -> tuple[jax.Array, jax.Array]:
  """Stage 2: ([C, D] category centroids, [C, 2, D] (bg, fg) prototypes).

  Args:
    cls: [N, D] CLS tokens of the split's images.
    batches: the split's batches (see the module docstring).
    dataset: stage 1 result.
    cfg: method config (num_categories <= N, see effective_method).
    key: pass_key(run key, "category_level").
    num_patches: N * h * w of the split (caps each category's reservoir).
  """
  sample_key, fit_key = jax.random.split(key)
  centroids = levels.fit_categories(cls, cfg, key=fit_key)
  budget = capped_budget(cfg, num_patches, per=cfg.num_categories)
  samples = levels.category_sample_init(dataclasses.replace(cfg, sample_budget=budget), dataset.centroids.shape[-1])
  for first, features in batches():
    categories = levels.assign_categories(features, centroids)
    samples = _sample_category_patches_donated(samples, features, categories, key=sample_key, first=first)
  return centroids, levels.fit_category_prototypes(samples, dataset, cfg)


def scores_and_probability(margins: jax.Array, valid: jax.Array, cfg: MethodConfig) -> tuple[jax.Array, jax.Array]:
  """Stage 4 on a batch: ([3, B, h, w] level scores, [B, h, w] fused fg probability) from level margins."""
  scores = level_scores(margins, valid, cfg.score_temperature)
  return scores, fuse(scores, cfg.fusion)


def image_level_and_fusion(features: PatchFeatures, dataset: levels.DatasetLevel, category_centroids: jax.Array,
                           category_prototypes: jax.Array, cfg: MethodConfig,
                           ) -> tuple[levels.LevelMargins, jax.Array, jax.Array]:
  """Stages 3-4 on one batch: (LevelMargins, [3, B, h, w] level scores, [B, h, w] fused fg probability)."""
  margins = levels.level_margins(features, dataset, category_centroids, category_prototypes, cfg)
  scores, fg_prob = scores_and_probability(margins.margins, features.valid, cfg)
  return margins, scores, fg_prob


def batches(features: PatchFeatures, batch_size: int) -> Iterator[PatchFeatures]:
  """Fixed-shape batches of an in-memory split; the last is padded with invalid images."""
  count = features.valid.shape[0]
  for start in range(0, count, batch_size):
    batch = jax.tree.map(lambda a: a[start:start + batch_size], features)
    missing = batch_size - batch.valid.shape[0]
    if missing:
      batch = jax.tree.map(lambda a: jnp.pad(a, [(0, missing)] + [(0, 0)] * (a.ndim - 1)), batch)
    yield batch


def segment_features(features: PatchFeatures, cfg: MethodConfig, *, key: jax.Array,
                     batch_size: int | None = None) -> MultilevelResult:
  """Stages 1-4 on a whole split held in memory, streamed in batches as the runner streams its chunks.

  With the runner's features, config, batch size and key = jax.random.key(config.seed), the levels and
  the fused probability equal the runner's (same pass functions, keys and budgets). num_categories is
  reduced to N when the split has fewer images, as the runner does.

  Args:
    features: [N, ...] PatchFeatures of every image.
    cfg: method config.
    key: PRNG key of the run.
    batch_size: images per batch; None = all at once.

  Returns:
    MultilevelResult.
  """
  count, height, width, _ = features.patches.shape
  batch_size = batch_size or count
  cfg = effective_method(cfg, count)
  stream = lambda: ((number * batch_size, batch) for number, batch in enumerate(batches(features, batch_size)))
  dataset, _ = fit_dataset_level(stream, cfg, key=pass_key(key, "dataset_level"), num_patches=count * height * width)
  category_centroids, category_prototypes = fit_category_level(
      jnp.asarray(features.cls), stream, dataset, cfg, key=pass_key(key, "category_level"),
      num_patches=count * height * width)
  outputs = []
  for _, batch in stream():
    margins, scores, fg_prob = image_level_and_fusion(batch, dataset, category_centroids, category_prototypes, cfg)
    outputs.append((margins.categories, margins.image_prototypes, scores, fg_prob))
  categories, image_prototypes, scores, fg_prob = (jnp.concatenate(parts, axis=part_axis)
                                                   for parts, part_axis in zip(zip(*outputs), (0, 0, 1, 0)))
  categories, image_prototypes, fg_prob = categories[:count], image_prototypes[:count], fg_prob[:count]
  scores = scores[:, :count]
  return MultilevelResult(dataset, category_centroids, category_prototypes, categories, image_prototypes,
                          scores, fg_prob, scores > 0.5, fg_prob > 0.5)


def label_pooled(patches: jax.Array, masks: Sequence[np.ndarray], cfg: MethodConfig, *,
                 key: jax.Array) -> list[np.ndarray]:
  """Stage 6 with "pooled" descriptors (no second ViT run) on a split held in memory.

  Args:
    patches: [N, h, w, D] patch features pooled into region descriptors.
    masks: N foreground masks [H_i, W_i] bool, any resolution (stage 5 output or patch grid).
    cfg: min_region_area, num_classes, k-means settings.
    key: PRNG key.

  Returns:
    N label maps [H_i, W_i] uint8: 0 = background, 1 + class.
  """
  grid = patches.shape[1:3]
  region_maps, descriptors = [], []
  for image_patches, mask in zip(patches, masks):
    region_map, count = labeling.regions(mask, cfg.min_region_area, cfg.min_region_fraction)
    fractions = labeling.region_patch_fractions(region_map, count, grid)
    region_maps.append((region_map, count))
    descriptors.append(labeling.pooled_descriptors(image_patches, fractions))
  centroids = labeling.fit_classes(jnp.concatenate(descriptors), cfg, key=key)
  return [labeling.label_map(region_map, labeling.assign_classes(image_descriptors, centroids))
          for (region_map, _), image_descriptors in zip(region_maps, descriptors)]

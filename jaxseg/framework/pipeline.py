"""The stages composed in memory, for research code and tests: the same streaming loop the runner runs.

    features = PatchFeatures(patches, cls, attention, valid)     # a whole small split
    result = segment_features(features, cfg, key=key)            # stages 1-4
    masks = [refine(image, p, cfg.crf) for image, p in zip(images, result.fg_prob)]  # stage 5
    labels = label_pooled(features.patches, masks, cfg, key=key)  # stage 6, "pooled" descriptors
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.cluster.stream import reservoir_init
from jaxseg.framework import labeling
from jaxseg.framework import levels
from jaxseg.framework.config import MethodConfig
from jaxseg.framework.features import PatchFeatures
from jaxseg.framework.fusion import fuse
from jaxseg.framework.fusion import level_scores


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


def scores_and_probability(margins: jax.Array, valid: jax.Array, cfg: MethodConfig) -> tuple[jax.Array, jax.Array]:
  """Stage 4 on a batch: ([3, B, h, w] level scores, [B, h, w] fused fg probability) from level margins."""
  scores = level_scores(margins, valid, cfg.score_temperature)
  return scores, fuse(scores, cfg.fusion)


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
  """Stages 1-4 on a whole split held in memory, streamed in batches as the runner does.

  Args:
    features: [N, ...] PatchFeatures of every image.
    cfg: method config.
    key: PRNG key.
    batch_size: images per batch; None = all at once.

  Returns:
    MultilevelResult.
  """
  count, _, _, dim = features.patches.shape
  batch_size = batch_size or count
  sample_key, dataset_key, category_key, category_sample_key = jax.random.split(key, 4)

  sample = reservoir_init(cfg.sample_budget, dim)
  for i, batch in enumerate(batches(features, batch_size)):
    sample = levels.sample_patches(sample, batch, key=jax.random.fold_in(sample_key, i))
  centroids = levels.fit_dataset_centroids(sample, cfg, key=dataset_key)
  stats = None
  for batch in batches(features, batch_size):
    stats = levels.accumulate_stats(stats, levels.dataset_cluster_stats(batch, centroids))
  dataset = levels.dataset_level(centroids, stats, cfg.fg_prior)

  category_centroids = levels.fit_categories(features.cls, cfg, key=category_key)
  samples = levels.category_sample_init(cfg, dim)
  for i, batch in enumerate(batches(features, batch_size)):
    categories = levels.assign_categories(batch, category_centroids)
    samples = levels.sample_category_patches(samples, batch, categories,
                                             key=jax.random.fold_in(category_sample_key, i))
  category_prototypes = levels.fit_category_prototypes(samples, dataset, cfg)

  outputs = []
  for batch in batches(features, batch_size):
    margins = levels.level_margins(batch, dataset, category_centroids, category_prototypes, cfg)
    scores, fg_prob = scores_and_probability(margins.margins, batch.valid, cfg)
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
    region_map, count = labeling.regions(mask, cfg.min_region_area)
    fractions = labeling.region_patch_fractions(region_map, count, grid)
    region_maps.append((region_map, count))
    descriptors.append(labeling.pooled_descriptors(image_patches, fractions))
  centroids = labeling.fit_classes(jnp.concatenate(descriptors), cfg, key=key)
  return [labeling.label_map(region_map, labeling.assign_classes(image_descriptors, centroids))
          for (region_map, _), image_descriptors in zip(region_maps, descriptors)]

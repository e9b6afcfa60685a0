"""Fixed-shape, padded, sharded, prefetched numpy batches from any indexable source."""

import collections
import concurrent.futures
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from jaxseg.data import images
from jaxseg.models import config as vit_config

IMAGENET_MEAN = np.array(vit_config.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.array(vit_config.IMAGENET_STD, np.float32)


def normalize_images(images, out: np.ndarray | None = None, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """uint8 (or float in [0, 255]) [..., 3] -> float32 (x / 255 - mean) / std.

  Works on numpy and jax arrays alike; `out` (C-contiguous numpy float32, same shape) is
  filled in place. mean, std: the backbone's own RGB statistics, ViTConfig.mean / .std
  (ImageNet's by default, as DINO, DINOv2 and DINOv3 LVD use).
  """
  # (x / 255 - mean) / std == x * scale - offset: two passes instead of four.
  scale = (1.0 / (255.0 * np.asarray(std, np.float64))).astype(np.float32)
  offset = (np.asarray(mean, np.float64) / np.asarray(std, np.float64)).astype(np.float32)
  if not isinstance(images, np.ndarray):  # jax: XLA fuses the arithmetic
    return images.astype(np.float32) * scale - offset
  if out is None:
    out = np.empty(images.shape, np.float32)
  elif out.shape != images.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
    raise ValueError(f"out must be C-contiguous float32 {images.shape}, got {out.dtype} {out.shape}.")
  # Flattening (W, 3) into rows makes the inner loop long and contiguous (5x faster than
  # broadcasting over a trailing axis of 3).
  width = images.shape[-2] if images.ndim >= 2 else 1
  rows_shape = images.shape[:-2] + (-1,)
  rows = out.reshape(rows_shape)
  np.multiply(images.reshape(rows_shape), np.tile(scale, width), out=rows, casting="unsafe")
  rows -= np.tile(offset, width)
  return out


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [S, S, 3], PIL bicubic (antialiased when shrinking)."""
  return images.resize(Image.fromarray(image), image_size)


def prepare_images(photos: Sequence[np.ndarray], image_size: int,
                   variant: "str | vit_config.ViTConfig | None" = None) -> np.ndarray:
  """ViT input from photos: N uint8 [H_i, W_i, 3] (any sizes) -> float32 [N, S, S, 3].

  Each photo is resized with resize_image (PIL bicubic, antialiased when shrinking) and
  normalised with normalize_images, exactly as `batches` prepares a dataset's images.
  image_size S must suit the backbone (a multiple of its patch size). variant (a name of
  models.VARIANTS or a ViTConfig) gives the mean and std; None means ViTConfig's default,
  ImageNet's (every variant but DINOv3's SAT-493M ones).

  Raises:
    ValueError naming the photo that is not uint8 [H, W, 3] (e.g. grayscale or RGBA).
  """
  cfg = vit_config.get_variant(variant) if isinstance(variant, str) else variant
  stats = {} if cfg is None else {"mean": cfg.mean, "std": cfg.std}
  out = np.empty((len(photos), image_size, image_size, 3), np.float32)
  for i, photo in enumerate(photos):
    photo = np.asarray(photo)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] != 3:
      raise ValueError(f"prepare_images: photos[{i}] must be uint8 [H, W, 3] RGB, got {photo.dtype} "
                       f"{list(photo.shape)} (RGBA: photo[..., :3]; gray: np.repeat(photo[..., None], 3, -1))")
    normalize_images(resize_image(np.ascontiguousarray(photo), image_size), out=out[i], **stats)
  return out


def shard_indices(num_items: int, *, shard: tuple[int, int] = (0, 1),
                  indices: Sequence[int] | None = None) -> np.ndarray:
  """Source indices one shard visits: every count-th of `indices` (default all), from index."""
  shard_index, shard_count = shard
  if not (shard_count >= 1 and 0 <= shard_index < shard_count):
    raise ValueError(f"shard={shard} must be (index, count) with 0 <= index < count.")
  order = np.arange(num_items) if indices is None else np.asarray(indices, np.int64).reshape(-1)
  if order.size and (order.min() < 0 or order.max() >= num_items):
    raise ValueError(f"indices must lie in [0, {num_items}); got {order.min()}..{order.max()}.")
  return order[shard_index::shard_count].astype(np.int64)


def _load_item(source, index: int, image_size: int, out: np.ndarray, stats: dict) -> dict:
  """Writes one item's normalised [S, S, 3] image into `out`; returns its id, size and mask."""
  if isinstance(source, images.ImageSource):  # resizes the decoded PIL image directly
    item = source.resized_item(int(index), image_size)
  else:
    item = dict(source[int(index)])
    item["size"] = item["image"].shape[:2]
    item["image"] = resize_image(item["image"], image_size)
  normalize_images(item["image"], out=out, **stats)
  return {"id": item["id"], "size": item["size"], "mask": item.get("mask")}


def batches(source, *, batch_size: int, image_size: int, patch_size: int,
            shard: tuple[int, int] = (0, 1), indices: Sequence[int] | None = None,
            prefetch: int = 2, num_workers: int | None = None, mean=IMAGENET_MEAN,
            std=IMAGENET_STD) -> Iterator[dict]:
  """Yields fixed-shape batches of resized images, normalised with the backbone's mean and std.

  Every shard yields the same number of batches, ceil(ceil(len(indices) / count) / batch_size),
  so multi-host loops stay in step; missing slots are padding (valid False). Items are loaded,
  decoded and resized by `num_workers` threads (PIL releases the GIL), up to `prefetch` batches
  ahead; an exception in a worker is raised by the iterator, and closing the iterator early
  cancels pending work.

  Args:
    source: sized, indexable; [i] -> {"id": str, "image": uint8 [H, W, 3], optional "mask"}.
    batch_size: B.
    image_size: S, the side images are resized to; a multiple of patch_size.
    patch_size: the ViT patch size.
    shard: (index, count): this process takes every count-th item starting at index.
    indices: source indices to visit, in order (default all), e.g. the rest of a resumed run.
    prefetch: batches prepared ahead of the consumer.
    num_workers: decoding threads (default min(8, os.cpu_count())).
    mean, std: RGB statistics of the backbone (ViTConfig.mean / .std).

  Yields:
    {"image": float32 [B, S, S, 3] (zeros for padding), "valid": bool [B], "id": list of B str ("" for padding),
     "size": int32 [B, 2] original (H, W) (0 for padding), "index": int64 [B] source index
     (-1 for padding), "mask": list of B uint8 [H, W] original-size masks, None for padding and
     for sources without masks}.
  """
  if batch_size < 1 or patch_size < 1 or image_size < 1:
    raise ValueError(f"batch_size ({batch_size}), image_size ({image_size}) and patch_size "
                     f"({patch_size}) must be positive.")
  if image_size % patch_size:
    raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size} "
                     f"(e.g. {max(1, round(image_size / patch_size)) * patch_size}).")
  if prefetch < 0:
    raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
  total = len(source) if indices is None else len(indices)
  order = shard_indices(len(source), shard=shard, indices=indices)
  num_batches = math.ceil(math.ceil(total / shard[1]) / batch_size)
  workers = num_workers or min(8, os.cpu_count() or 1)
  return _generate(source, order, num_batches, batch_size, image_size, prefetch, workers,
                   {"mean": mean, "std": std})


def _generate(source, order: np.ndarray, num_batches: int, batch_size: int, image_size: int,
              prefetch: int, workers: int, stats: dict) -> Iterator[dict]:
  executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxseg-batches")
  pending = collections.deque()  # per batch: (source indices, pixel buffer, futures)

  def submit(batch_number: int):
    chunk = order[batch_number * batch_size:(batch_number + 1) * batch_size]
    pixels = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    pending.append((chunk, pixels, [executor.submit(_load_item, source, i, image_size, pixels[slot], stats)
                                    for slot, i in enumerate(chunk)]))

  try:
    for batch_number in range(min(num_batches, prefetch + 1)):
      submit(batch_number)
    for batch_number in range(num_batches):
      chunk, pixels, futures = pending.popleft()
      items = [future.result() for future in futures]
      if batch_number + prefetch + 1 < num_batches:
        submit(batch_number + prefetch + 1)
      yield _collate(chunk, pixels, items)
  finally:
    for _, _, futures in pending:
      for future in futures:
        future.cancel()
    executor.shutdown(wait=False, cancel_futures=True)


def _collate(chunk: np.ndarray, pixels: np.ndarray, items: list[dict]) -> dict:
  batch_size = len(pixels)
  sizes = np.zeros((batch_size, 2), np.int32)
  index = np.full((batch_size,), -1, np.int64)
  valid = np.zeros((batch_size,), bool)
  ids = [""] * batch_size
  masks = [None] * batch_size
  for slot, item in enumerate(items):
    sizes[slot] = item["size"]
    ids[slot] = item["id"]
    masks[slot] = item["mask"]
  index[:len(chunk)] = chunk
  valid[:len(chunk)] = True
  return {"image": pixels, "valid": valid, "id": ids, "size": sizes,
          "index": index, "mask": masks}

"""Decoded + resized + normalised images/s: jaxseg.data (prepared voc_seg split, batches) vs a
plain PIL decode/resize loop over the same JPEG files.

  python -m experiments.benchmark --only=data
"""

import os
import pathlib
import tempfile

import numpy as np
from PIL import Image

import jaxseg.data
from experiments.benchmarks import common

_NUM_IMAGES = 64
_HEIGHT, _WIDTH = 375, 500  # VOC's typical landscape size
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _write_voc_like(root: pathlib.Path, count: int) -> list[pathlib.Path]:
  """A VOCdevkit/VOC2012 with `count` photo-like 500x375 JPEGs, all in the train split."""
  devkit = root / "VOCdevkit" / "VOC2012"
  for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (devkit / folder).mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  ys, xs = np.mgrid[0:_HEIGHT, 0:_WIDTH]
  ids, paths = [], []
  for number in range(count):
    image_id = f"2012_{number:06d}"
    phase = rng.uniform(0, 6, 3)
    smooth = 127 + 100 * np.sin(xs[..., None] / rng.uniform(20, 80) + ys[..., None] / 50 + phase)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    path = devkit / "JPEGImages" / f"{image_id}.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    mask = Image.fromarray((smooth[..., 0] > 127).astype(np.uint8) * int(1 + number % 20), mode="P")
    mask.putpalette([0, 0, 0] + [128, 0, 0] * 255)
    mask.save(devkit / "SegmentationClass" / f"{image_id}.png")
    ids.append(image_id)
    paths.append(path)
  for split in ("train", "val"):
    (devkit / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
  return paths


def _reference(paths: list[pathlib.Path], batch_size: int, image_size: int) -> int:
  """What research code does today: open, convert, resize one at a time; stack, normalise."""
  done = 0
  for start in range(0, len(paths), batch_size):
    batch = [np.asarray(Image.open(p).convert("RGB").resize((image_size, image_size), Image.BICUBIC))
             for p in paths[start:start + batch_size]]
    done += len((np.stack(batch).astype(np.float32) / 255.0 - _MEAN) / _STD)
  return done


def _jaxseg(source, batch_size: int, image_size: int, patch_size: int) -> int:
  return sum(int(b["valid"].sum()) for b in jaxseg.data.batches(
      source, batch_size=batch_size, image_size=image_size, patch_size=patch_size))


def run():
  with tempfile.TemporaryDirectory() as scratch:
    scratch = pathlib.Path(scratch)
    paths = _write_voc_like(scratch / "manual", _NUM_IMAGES)
    source = jaxseg.data.load("voc_seg", "train", data_dir=scratch / "data", manual_dir=scratch / "manual")
    assert len(source) == _NUM_IMAGES
    for image_size, patch_size in ((448, 14), (224, 16)):
      assert _jaxseg(source, 16, image_size, patch_size) == _reference(paths, 16, image_size) == _NUM_IMAGES
      ours = ref = float("inf")
      for _ in range(3):  # interleaved, so load from other processes hits both sides alike
        ours = min(ours, common.best_time(lambda: _jaxseg(source, 16, image_size, patch_size),
                                          repeat=1, warmup=0))
        ref = min(ref, common.best_time(lambda: _reference(paths, 16, image_size), repeat=1, warmup=0))
      per_image = 1000.0 / _NUM_IMAGES
      common.row(f"data voc 500x375 jpeg -> {image_size} (B=16)", ours * per_image, ref * per_image,
                 "ms/img", f"{_NUM_IMAGES / ours:.0f} vs {_NUM_IMAGES / ref:.0f} img/s, "
                 f"cpus={os.cpu_count()}")

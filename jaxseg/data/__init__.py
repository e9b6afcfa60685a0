"""Datasets (TFDS builders for VOC and COCO, image folders) and batching. All I/O lives here.

Importing this package registers the TFDS builders `voc_seg` (config 2012) and `coco_object`
(config 2017). TensorFlow is never imported: builders write array_record files that are read
with tfds.data_source; images are stored as their original encoded bytes and decoded with PIL.

  source = jaxseg.data.load("voc_seg", "val", data_dir="~/tensorflow_datasets",
                            manual_dir="~/downloads")  # holds VOCtrainval_11-May-2012.tar
  for batch in jaxseg.data.batches(source, batch_size=32, image_size=448, patch_size=14):
    ...  # batch["image"]: float32 [32, 448, 448, 3]; batch["valid"], ["index"], ["mask"], ...
  vit_input = jaxseg.data.prepare_images(photos, 448)  # N uint8 [H, W, 3] -> float32 [N, 448, 448, 3]

Bad archives stop preparation with an error naming the file (a listed image without its JPEG
or mask, a truncated JPEG, a mask that is not a palette PNG or has values outside the classes,
an annotation for an unknown image or category, a size mismatch). Nothing is skipped, so a
prepared split is always the complete official split; nothing half-built is left behind
(TFDS writes into a temporary folder), and preparing again after fixing the file works.
"""

from jaxseg.data.batching import IMAGENET_MEAN
from jaxseg.data.batching import IMAGENET_STD
from jaxseg.data.batching import batches
from jaxseg.data.batching import normalize_images
from jaxseg.data.batching import prepare_images
from jaxseg.data.batching import resize_image
from jaxseg.data.batching import shard_indices
from jaxseg.data.coco import CocoObject
from jaxseg.data.folder import FolderSource
from jaxseg.data.sources import class_names
from jaxseg.data.sources import load
from jaxseg.data.voc import VocSeg

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "batches", "normalize_images", "prepare_images", "resize_image",
           "shard_indices", "CocoObject", "FolderSource", "class_names", "load", "VocSeg"]

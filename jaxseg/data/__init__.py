"""Datasets (TFDS builders for VOC and COCO, image folders) and batching. All I/O lives here.

Importing this package registers the TFDS builders `voc_seg` (config 2012) and `coco_object`
(config 2017). TensorFlow is never imported: builders write array_record files that are read
with tfds.data_source, and images are decoded with PIL.
"""

from jaxseg.data.batching import IMAGENET_MEAN
from jaxseg.data.batching import IMAGENET_STD
from jaxseg.data.batching import batches
from jaxseg.data.batching import normalize_images
from jaxseg.data.batching import resize_image
from jaxseg.data.coco import CocoObject
from jaxseg.data.folder import FolderSource
from jaxseg.data.sources import class_names
from jaxseg.data.sources import load
from jaxseg.data.voc import VocSeg

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "batches", "normalize_images", "resize_image",
           "CocoObject", "FolderSource", "class_names", "load", "VocSeg"]

"""TFDS builder `coco_object`: MS COCO 2017 as 81-class semantic segmentation (0 = background)."""

import json
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from jaxseg.data import archive
from jaxseg.data import builder_common
from jaxseg.data import images

# The 80 thing categories, in ascending COCO category id (1..90 with gaps).
COCO_THING_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
COCO_CLASSES = ("background",) + COCO_THING_CLASSES

_VOID = 255
_SPLITS = ("train", "val")
_ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
_URLS = {"annotations": f"http://images.cocodataset.org/annotations/{_ANNOTATIONS_ZIP}",
         "train": "http://images.cocodataset.org/zips/train2017.zip",
         "val": "http://images.cocodataset.org/zips/val2017.zip"}
_EXPECTED = (f"  {_ANNOTATIONS_ZIP} or annotations/instances_{{train,val}}2017.json, and\n"
             "  val2017.zip and/or train2017.zip, or the extracted val2017/ and/or train2017/ folders\n"
             "  (a split is built when both its annotations and its images are present)")


def instance_mask(annotation: Mapping, height: int, width: int) -> np.ndarray:
  """One annotation's segmentation (polygons, RLE or compressed RLE) -> bool [H, W]."""
  segmentation = annotation["segmentation"]
  if isinstance(segmentation, list):  # polygons: one object may have several parts
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  elif isinstance(segmentation["counts"], list):  # uncompressed RLE
    rle = mask_utils.frPyObjects(segmentation, height, width)
  else:  # compressed RLE
    rle = segmentation
  return mask_utils.decode(rle).astype(bool)


def semantic_mask(annotations: Iterable[Mapping], class_of_category: Mapping[int, int], height: int,
                  width: int) -> np.ndarray:
  """Paints one image's instances into class indices, uint8 [H, W].

  Non-crowd instances are painted from the largest `area` to the smallest, so the smaller one
  wins where they overlap (ties keep annotation order). Crowd regions become 255 where no
  non-crowd instance covers the pixel; everything else is 0 (background).
  """
  annotations = list(annotations)
  labels = np.zeros((height, width), np.uint8)
  things = sorted((a for a in annotations if not a.get("iscrowd", 0)), key=lambda a: -a["area"])
  covered = np.zeros((height, width), bool)
  for annotation in things:
    region = instance_mask(annotation, height, width)
    labels[region] = class_of_category[annotation["category_id"]]
    covered |= region
  for annotation in annotations:
    if annotation.get("iscrowd", 0):
      labels[instance_mask(annotation, height, width) & ~covered] = _VOID
  return labels


def _locate(manual_dir: pathlib.Path) -> dict[str, tuple[archive.FileTree, archive.FileTree]]:
  """Per available split: (tree holding annotations/, tree holding {split}2017/)."""
  if (manual_dir / _ANNOTATIONS_ZIP).is_file():
    annotations = archive.FileTree(manual_dir / _ANNOTATIONS_ZIP)
  else:
    annotations = archive.FileTree(manual_dir)
  trees = {}
  for split in _SPLITS:
    if not annotations.exists(f"annotations/instances_{split}2017.json"):
      continue
    if (manual_dir / f"{split}2017.zip").is_file():
      trees[split] = (annotations, archive.FileTree(manual_dir / f"{split}2017.zip"))
    elif (manual_dir / f"{split}2017").is_dir():
      trees[split] = (annotations, archive.FileTree(manual_dir))
  if not trees:
    raise builder_common.wrong_manual_dir("coco_object", manual_dir, _EXPECTED)
  return trees


class CocoObject(builder_common.SegmentationBuilder):
  """MS COCO 2017 things as semantic masks: train 118,287 and val 5,000 images, 81 classes.

  Class index = 1 + rank of the category id in ascending order (0 = background, 255 = crowd
  not covered by any non-crowd instance). Bad archives stop the build with an error naming the
  file or annotation: a missing or corrupt image, an annotation for an unknown image or
  category, an image whose size disagrees with the annotations.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEG bytes, semantic masks painted with pycocotools."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017", description="COCO 2017 instances.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place in manual_dir:\n{_EXPECTED}\nor leave it empty to download."

  DESCRIPTION = "MS COCO 2017 things as semantic masks; 0 background, 1..80, 255 crowd."
  HOMEPAGE = "https://cocodataset.org/"
  CITATION = ("@inproceedings{lin2014microsoft, title={Microsoft COCO: Common Objects in "
              "Context}, author={Lin, Tsung-Yi and others}, booktitle={ECCV}, year={2014}}")

  def _split_generators(self, dl_manager):
    manual_dir = builder_common.configured_manual_dir(dl_manager)
    if manual_dir is not None:
      trees = _locate(manual_dir)
    else:
      paths = dl_manager.download(_URLS)
      annotations = archive.FileTree(paths["annotations"])
      trees = {split: (annotations, archive.FileTree(paths[split])) for split in _SPLITS}
    return {split: self._generate_examples(*trees[split], split) for split in trees}

  def _generate_examples(self, annotation_tree: archive.FileTree, image_tree: archive.FileTree,
                         split: str):
    json_path = f"annotations/instances_{split}2017.json"
    json_name = annotation_tree.describe(json_path)
    instances = json.loads(annotation_tree.read(json_path))
    category_ids = sorted(c["id"] for c in instances["categories"])
    class_of_category = {category_id: 1 + rank for rank, category_id in enumerate(category_ids)}
    image_infos = {info["id"]: info for info in instances["images"]}
    per_image = {image_id: [] for image_id in image_infos}
    for annotation in instances["annotations"]:
      if annotation["image_id"] not in per_image:
        raise ValueError(f"coco_object: annotation {annotation['id']} in {json_name} refers to "
                         f"unknown image id {annotation['image_id']}.")
      if annotation["category_id"] not in class_of_category:
        raise ValueError(f"coco_object: annotation {annotation['id']} in {json_name} has unknown "
                         f"category id {annotation['category_id']}.")
      per_image[annotation["image_id"]].append(annotation)
    for info in sorted(image_infos.values(), key=lambda info: info["file_name"]):
      image_path = f"{split}2017/{info['file_name']}"
      if not image_tree.exists(image_path):
        raise FileNotFoundError(f"coco_object: {image_tree.describe(image_path)} is missing; "
                                f"image id {info['id']} is listed in {json_name}.")
      image_bytes = image_tree.read(image_path)
      size_hw = (info["height"], info["width"])
      images.check_image(image_bytes, name=image_tree.describe(image_path), size_hw=size_hw)
      image_id = info["file_name"].rsplit(".", 1)[0]
      mask = semantic_mask(per_image[info["id"]], class_of_category, *size_hw)
      yield image_id, {"id": image_id, "image": image_bytes, "mask": mask}

"""TFDS builder `voc_seg`: PASCAL VOC 2012 semantic segmentation (21 classes, 255 = void)."""

import pathlib

import tensorflow_datasets as tfds

from jaxseg.data import archive
from jaxseg.data import builder_common
from jaxseg.data import images

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

_TAR_NAME = "VOCtrainval_11-May-2012.tar"
_URL = f"http://host.robots.ox.ac.uk/pascal/VOC/voc2012/{_TAR_NAME}"
_EXPECTED = (f"  {_TAR_NAME} (the official archive), or\n"
             "  VOCdevkit/VOC2012/ (extracted), or VOC2012/, or the VOC2012 folder itself, holding\n"
             "  JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt")
_VOID = 255


def _locate(manual_dir: pathlib.Path) -> archive.FileTree:
  """Finds the VOC2012 folder (in the tar or extracted) under manual_dir."""
  if (manual_dir / _TAR_NAME).is_file():
    return archive.FileTree(manual_dir / _TAR_NAME, "VOCdevkit/VOC2012")
  for folder in (manual_dir / "VOCdevkit" / "VOC2012", manual_dir / "VOC2012", manual_dir):
    if (folder / "ImageSets" / "Segmentation").is_dir():
      return archive.FileTree(folder)
  raise builder_common.wrong_manual_dir("voc_seg", manual_dir, _EXPECTED)


class VocSeg(builder_common.SegmentationBuilder):
  """PASCAL VOC 2012 segmentation: train 1,464 and val 1,449 images, masks as class indices.

  Bad archives stop the build with an error naming the file: a listed id without its JPEG or
  mask, a truncated/corrupt JPEG, a mask that is not a palette PNG, a size mismatch. Skipping
  would silently score a different split than every published number.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEG bytes, palette-index masks."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2012", description="VOC2012 segmentation.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place in manual_dir:\n{_EXPECTED}\nor leave it empty to download."

  DESCRIPTION = "PASCAL VOC 2012 semantic segmentation; mask 0..20, 255 = void."
  HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
  CITATION = ("@article{everingham2010pascal, title={The PASCAL Visual Object Classes (VOC) "
              "Challenge}, author={Everingham, M. and others}, journal={IJCV}, year={2010}}")

  def _split_generators(self, dl_manager):
    manual_dir = builder_common.configured_manual_dir(dl_manager)
    if manual_dir is not None:
      tree = _locate(manual_dir)
    else:
      tree = archive.FileTree(dl_manager.download(_URL), "VOCdevkit/VOC2012")
    return {split: self._generate_examples(tree, split) for split in ("train", "val")}

  def _generate_examples(self, tree: archive.FileTree, split: str):
    list_path = f"ImageSets/Segmentation/{split}.txt"
    ids = [line.strip() for line in tree.read(list_path).decode().splitlines() if line.strip()]
    for image_id in ids:
      image_path, mask_path = f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png"
      for path in (image_path, mask_path):
        if not tree.exists(path):
          raise FileNotFoundError(f"voc_seg: {tree.describe(path)} is missing; {image_id} is "
                                  f"listed in {tree.describe(list_path)}.")
      mask = images.decode_index_png(tree.read(mask_path), name=tree.describe(mask_path))
      stray = (mask >= len(VOC_CLASSES)) & (mask != _VOID)
      if stray.any():
        raise ValueError(f"voc_seg: mask {tree.describe(mask_path)} has values "
                         f"{sorted(set(mask[stray].tolist()))[:5]} outside 0..20 and 255.")
      image_bytes = tree.read(image_path)
      images.check_image(image_bytes, name=tree.describe(image_path), size_hw=mask.shape)
      yield image_id, {"id": image_id, "image": image_bytes, "mask": mask}

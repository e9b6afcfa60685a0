"""`load` and `class_names`: one entry point for VOC, COCO, image folders and sample photos."""

import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from jaxseg.data import coco
from jaxseg.data import folder
from jaxseg.data import images
from jaxseg.data import voc

_BUILDERS = {"voc_seg": (voc.VocSeg, "2012"), "coco_object": (coco.CocoObject, "2017")}
_NAMES = "'voc_seg', 'coco_object', 'folder:/some/path' or 'skimage'"


class DatasetSource(images.ImageSource):
  """A prepared TFDS split read with tfds.data_source, decoded with PIL on access.

  Items are {"id": str, "image": uint8 [H, W, 3], "mask": uint8 [H, W]}.
  """

  def __init__(self, records, name: str):
    self._records = records
    self.name = name

  def __len__(self) -> int:
    return len(self._records)

  def _open(self, index: int):
    record = self._records[index]
    image_id = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
    image = images.open_rgb(record["image"], name=f"{self.name} item {image_id}")
    return image_id, image, {"mask": np.array(record["mask"])}  # writeable copy


def _builder(name: str, data_dir: str | os.PathLike) -> tfds.core.GeneratorBasedBuilder:
  base, _, config = name.partition("/")
  builder_class, default_config = _BUILDERS[base]
  return builder_class(config=config or default_config, data_dir=os.fspath(data_dir),
                       file_format="array_record")


def load(name: str, split: str | None = None, *, data_dir: str | os.PathLike,
         manual_dir: str | os.PathLike | None = None):
  """Prepares a dataset if needed and returns a sized, indexable source of dicts.

  Args:
    name: "voc_seg" (or "voc_seg/2012"), "coco_object" (or "coco_object/2017"),
      "folder:/some/path" (every image under it, recursively) or "skimage" (scikit-image's
      sample photographs, written to data_dir/skimage_photos on first use).
    split: "train" or "val" (TFDS slices such as "val[:10]" work) for the datasets; ignored for folders and "skimage".
    data_dir: where TFDS keeps prepared datasets (and downloads, when no manual_dir is given).
    manual_dir: folder holding the official archives or their extracted contents.

  Returns:
    source with len() and [i] -> {"id": str, "image": uint8 [H, W, 3], "mask": uint8 [H, W]}
    ("mask" absent for folders and "skimage").
  """
  if name.startswith("folder:"):
    return folder.FolderSource(name[len("folder:"):])
  if name == "skimage":
    return folder.FolderSource(folder.skimage_photos(data_dir))
  if name.partition("/")[0] not in _BUILDERS:
    raise ValueError(f"Unknown dataset {name!r}; choose {_NAMES}.")
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    download_config = None
    if manual_dir is not None:
      manual_dir = pathlib.Path(manual_dir)
      if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
        raise FileNotFoundError(f"{name}: manual_dir {manual_dir} does not exist or is empty. "
                                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    builder.download_and_prepare(download_config=download_config)
  if str(split).partition("[")[0] not in builder.info.splits:
    raise ValueError(f"{name} at {builder.data_dir} has splits {sorted(builder.info.splits)}, not "
                     f"{split!r} (a split is only built if its files were in manual_dir when it "
                     "was prepared; delete that folder to prepare again).")
  return DatasetSource(builder.as_data_source(split=split), f"{name}/{split}")


def class_names(name: str) -> list[str]:
  """Class names by label index, background first: 21 for VOC, 81 for COCO."""
  base = name.partition("/")[0]
  if base == "voc_seg":
    return list(voc.VOC_CLASSES)
  if base == "coco_object":
    return list(coco.COCO_CLASSES)
  raise ValueError(f"No class names for {name!r}; datasets with classes: 'voc_seg', 'coco_object'.")

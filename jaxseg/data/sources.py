"""`load` and `class_names`: one entry point for VOC, COCO, image folders and sample photos."""

import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from jaxseg import _files
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


# Written next to a prepared dataset: the manual_dir it was prepared from, and each of its files' size and mtime.
MANUAL_FILES = "jaxseg_manual_files.json"


def _manual_files(manual_dir: pathlib.Path) -> dict[str, list[int]]:
  """{path relative to manual_dir: [size, mtime_ns]} of every file under it (archives or extracted trees)."""
  files = {}
  for path in sorted(manual_dir.rglob("*")):
    if path.is_file():
      stat = path.stat()
      files[path.relative_to(manual_dir).as_posix()] = [stat.st_size, stat.st_mtime_ns]
  return files


def _record_manual_dir(data_dir: pathlib.Path, manual_dir: pathlib.Path) -> None:
  record = {"manual_dir": str(manual_dir.resolve()), "files": _manual_files(manual_dir)}
  _files.atomic_write_bytes(data_dir / MANUAL_FILES, json.dumps(record).encode())


def _check_manual_dir(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path) -> None:
  """Refuses a prepared dataset whose manual_dir's files changed since it was prepared from them.

  Only the folder it was prepared from is compared: another manual_dir (moved archives) is not looked at.
  """
  try:
    record = json.loads((data_dir / MANUAL_FILES).read_text())
  except (OSError, ValueError):
    return  # prepared before this record existed, or without a manual_dir
  if record.get("manual_dir") != str(manual_dir.resolve()):
    return
  recorded, now = record["files"], _manual_files(manual_dir)
  changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
  if changed:
    raise ValueError(f"{name} at {data_dir} was prepared from other files than manual_dir {manual_dir} holds now "
                     f"({len(changed)} added, removed or changed, e.g. {changed[0]}): delete {data_dir} to prepare "
                     "it again from them, or give another data_dir")


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

  Raises:
    ValueError: a dataset prepared in data_dir from this manual_dir, whose files (size, mtime) changed since:
      it is never silently reused; the message says how to prepare it again.
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
    if manual_dir is not None:
      _record_manual_dir(pathlib.Path(builder.data_dir), manual_dir)
  elif manual_dir is not None and pathlib.Path(manual_dir).is_dir():
    _check_manual_dir(name, pathlib.Path(builder.data_dir), pathlib.Path(manual_dir))
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

"""The source pass: which images the run covers, recorded so that any change to them is seen.

Its fingerprint covers the ordered image ids with their sizes (read from the file headers, no pixels
decoded) and, for image folders, each file's size and mtime, so a replaced image of the same size, an
image added mid-split or a shortened split all change it. Where the files are (data_dir, manual_dir,
the folder's path) is not part of it.
"""

import io

import ml_collections
import PIL.Image

import jaxseg.data
from experiments.passes.context import digest


def _header_size(data: bytes) -> list[int]:
  with PIL.Image.open(io.BytesIO(data)) as image:
    return [image.height, image.width]


def describe(source, count: int) -> list[dict]:
  """One entry per image of the run (the first `count` of the source), in order.

  Returns:
    [{"index": int, "id": str, "size": [H, W] as stored, "file": [bytes, mtime_ns] (folders only)}].
  """
  images = []
  for index in range(count):
    if isinstance(source, jaxseg.data.FolderSource):
      path = source.paths[index]
      stat = path.stat()
      with PIL.Image.open(path) as image:
        entry = {"id": source.ids[index], "size": [image.height, image.width],
                 "file": [stat.st_size, stat.st_mtime_ns]}
    elif hasattr(source, "_records"):  # a TFDS split: the encoded image's header, without decoding pixels
      record = source._records[index]  # pylint: disable=protected-access
      image_id = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
      entry = {"id": image_id, "size": _header_size(record["image"])}
    else:
      item = source[index]
      entry = {"id": item["id"], "size": list(item["image"].shape[:2])}
    images.append({"index": index, **entry})
  return images


def fingerprint(config: ml_collections.ConfigDict, images: list[dict]) -> str:
  """Of the dataset (name and split, not its location) and every image entry."""
  name = config.data.name
  dataset = "folder" if name.startswith("folder:") else [name, config.data.split]
  return digest([dataset, images])


def changes(old: list[dict] | None, new: list[dict]) -> str:
  """A short account of how the image list changed, e.g. "1 added, 1 changed"."""
  if old is None:
    return "new"
  before = {image["id"]: image for image in old}
  after = {image["id"]: image for image in new}
  added = len(after.keys() - before.keys())
  removed = len(before.keys() - after.keys())
  changed = sum(1 for i in after.keys() & before.keys()
                if {k: v for k, v in after[i].items() if k != "index"} != {k: v for k, v in before[i].items()
                                                                           if k != "index"})
  parts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
  return ", ".join(parts) or "reordered"

"""The source: which images the run covers and what is in them, recorded so that any change to them is seen.

Two roots of the pass graph (experiments/passes/__init__.py):
  SOURCE  the ordered images: id, size (from the file header) and a hash of the encoded bytes ("content"),
          so a replaced image of the same id and size, an image added mid-split or a shortened split all
          change it; the features chunks depend on their own images' entries alone.
  LABELS  a hash of each image's label map ("label", None without one): changed labels re-score (they redo
          the passes that count against the labels: refinement's fg_stats, the report), not the features.
Where the files are (data_dir, manual_dir, the folder's path) is in neither. TFDS records are read whole
anyway (the header and the label are in them), so hashing costs little; an image folder's files are hashed
once and the hash is reused by later starts while a file's size and mtime are those it was hashed at.
"""

import hashlib
import io

import ml_collections
import numpy as np
import PIL.Image

import jaxseg.data
from experiments.passes.context import digest
from experiments.passes.context import image_identity


def _header_size(data: bytes) -> list[int]:
  with PIL.Image.open(io.BytesIO(data)) as image:
    return [image.height, image.width]


def _hash(*parts: bytes) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part)
  return h.hexdigest()[:32]


def _label_hash(mask) -> str | None:
  if mask is None:
    return None
  mask = np.asarray(mask)
  return _hash(str(mask.shape).encode(), str(mask.dtype).encode(), np.ascontiguousarray(mask).tobytes())


def describe(source, count: int, previous: list[dict] | None = None) -> list[dict]:
  """One entry per image of the run (the first `count` of the source), in order.

  Args:
    source: a jaxseg.data source.
    count: images of the run.
    previous: the entries of an earlier start (its manifests' record): a folder image whose file has the
      size and mtime it had then keeps its content hash without being read again.

  Returns:
    [{"index", "id", "size": [H, W] as stored, "content": hash of the encoded image, "label": hash or None,
      "file": [bytes, mtime_ns] (folders only: the cache key of "content", in no fingerprint)}].
  """
  known = {entry["id"]: entry for entry in previous or () if "content" in entry}
  images = []
  for index in range(count):
    if isinstance(source, jaxseg.data.FolderSource):
      path = source.paths[index]
      stat = path.stat()
      image_id, file = source.ids[index], [stat.st_size, stat.st_mtime_ns]
      before = known.get(image_id)
      if before is not None and before.get("file") == file:
        entry = {"id": image_id, "size": before["size"], "content": before["content"], "file": file}
      else:
        data = path.read_bytes()
        entry = {"id": image_id, "size": _header_size(data), "content": _hash(data), "file": file}
      entry["label"] = None
    elif hasattr(source, "_records"):  # a TFDS split: the encoded image's header, without decoding pixels
      record = source._records[index]  # pylint: disable=protected-access
      image_id = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
      entry = {"id": image_id, "size": _header_size(record["image"]), "content": _hash(record["image"]),
               "label": _label_hash(record.get("mask"))}
    else:
      item = source[index]
      image = np.ascontiguousarray(item["image"])
      entry = {"id": item["id"], "size": list(image.shape[:2]), "content": _hash(image.tobytes()),
               "label": _label_hash(item.get("mask"))}
    images.append({"index": index, **entry})
  return images


def fingerprint(config: ml_collections.ConfigDict, images: list[dict]) -> str:
  """Of the dataset (name and split, not its location) and every image's identity."""
  name = config.data.name
  dataset = "folder" if name.startswith("folder:") else [name, config.data.split]
  return digest([dataset, [image_identity(image) for image in images]])


def labels(images: list[dict]) -> list[dict]:
  """The LABELS root's record: [{"id", "label"}] in order."""
  return [{"id": image["id"], "label": image["label"]} for image in images]


def label_fingerprint(images: list[dict]) -> str:
  """Of every image's label hash, in order."""
  return digest(labels(images))


def changes(old: list[dict] | None, new: list[dict], identity=image_identity) -> str:
  """A short account of how the image list changed, e.g. "1 added, 1 changed"."""
  if old is None:
    return "new"
  same = lambda entry: {k: v for k, v in identity(entry).items() if k != "index"}
  before = {image["id"]: image for image in old}
  after = {image["id"]: image for image in new}
  added = len(after.keys() - before.keys())
  removed = len(before.keys() - after.keys())
  changed = sum(1 for i in after.keys() & before.keys() if same(after[i]) != same(before[i]))
  parts = [f"{n} {what}" for n, what in ((added, "added"), (removed, "removed"), (changed, "changed")) if n]
  return ", ".join(parts) or "reordered"


def label_changes(old: list[dict] | None, new: list[dict]) -> str:
  """E.g. "2 changed" (label maps of the same ids), or how the ids changed."""
  return changes(old, labels(new), identity=lambda entry: entry)

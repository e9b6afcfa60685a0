"""Builders of tiny datasets in the exact official layouts, for tests across the project.

  make_voc_devkit(root)  -> root/VOCdevkit/VOC2012/... (JPEGImages, SegmentationClass, ImageSets)
  make_voc_tar(root)     -> root/VOCtrainval_11-May-2012.tar holding VOCdevkit/VOC2012/...
  make_coco(root)        -> root/annotations_trainval2017.zip, root/val2017.zip, root/train2017.zip

Images show their objects as flat coloured rectangles on a gradient, so segmentation code has
something to find. Pass the root as manual_dir to jaxseg.data.load.
"""

import io
import json
import pathlib
import tarfile
import tempfile
import zipfile

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

VOC_TAR_NAME = "VOCtrainval_11-May-2012.tar"
# The VOC2012 class names in label order (0 = background), as the devkit lists them.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_palette() -> list[int]:
  """The 256-entry VOC colour map (bit-interleaved), flattened to 768 ints."""
  palette = []
  for label in range(256):
    red = green = blue = 0
    value = label
    for shift in range(7, -1, -1):
      red |= ((value >> 0) & 1) << shift
      green |= ((value >> 1) & 1) << shift
      blue |= ((value >> 2) & 1) << shift
      value >>= 3
    palette += [red, green, blue]
  return palette


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  ys, xs = np.mgrid[0:height, 0:width]
  base = rng.integers(40, 120, 3)
  gradient = np.stack([ys * 60 // max(height, 1), xs * 60 // max(width, 1), (ys + xs) % 17], -1)
  return (base + gradient).clip(0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
  return buffer.getvalue()


def _voc_example(rng: np.random.Generator, height: int, width: int):
  """(image uint8 [H, W, 3], mask uint8 [H, W]) with 1-2 rectangles and 255 borders."""
  image = _background(rng, height, width)
  mask = np.zeros((height, width), np.uint8)
  for _ in range(int(rng.integers(1, 3))):
    top, left = int(rng.integers(2, height // 2)), int(rng.integers(2, width // 2))
    bottom = int(rng.integers(top + 8, height - 1))
    right = int(rng.integers(left + 8, width - 1))
    label = int(rng.integers(1, 21))
    mask[top - 2:bottom + 2, left - 2:right + 2] = 255  # VOC's void band around objects
    mask[top:bottom, left:right] = label
    image[top:bottom, left:right] = np.array(voc_palette()[3 * label:3 * label + 3]) // 2 + 100
  return image, mask


def make_voc_devkit(root, *, n_train: int = 3, n_val: int = 2, n_detection_only: int = 2,
                    seed: int = 0) -> dict[str, list[str]]:
  """Writes root/VOCdevkit/VOC2012 with segmentation and detection-only images.

  Segmentation ids go to ImageSets/Segmentation/{train,val,trainval}.txt with a palette PNG in
  SegmentationClass; detection-only images have a JPEG and an Annotations XML but no mask and
  appear only in ImageSets/Main. Sizes vary between images (about 40-64 pixels a side).

  Returns:
    {"train": ids, "val": ids, "detection_only": ids}.
  """
  rng = np.random.default_rng(seed)
  devkit = pathlib.Path(root) / "VOCdevkit" / "VOC2012"
  for folder in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation",
                 "ImageSets/Main"):
    (devkit / folder).mkdir(parents=True, exist_ok=True)
  counts = {"train": n_train, "val": n_val, "detection_only": n_detection_only}
  ids, serial = {}, 0
  for split, count in counts.items():
    ids[split] = []
    for _ in range(count):
      serial += 1
      image_id = f"{2007 + serial % 5}_{serial:06d}"
      ids[split].append(image_id)
      height, width = int(rng.integers(40, 65)), int(rng.integers(40, 65))
      image, mask = _voc_example(rng, height, width)
      (devkit / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(image))
      (devkit / "Annotations" / f"{image_id}.xml").write_text(
          f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
          f"<height>{height}</height><depth>3</depth></size></annotation>\n")
      if split != "detection_only":
        png = Image.fromarray(mask, mode="P")
        png.putpalette(voc_palette())
        png.save(devkit / "SegmentationClass" / f"{image_id}.png")
  for split in ("train", "val"):
    (devkit / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
        "".join(f"{i}\n" for i in sorted(ids[split])))
  (devkit / "ImageSets" / "Segmentation" / "trainval.txt").write_text(
      "".join(f"{i}\n" for i in sorted(ids["train"] + ids["val"])))
  all_ids = sorted(i for split_ids in ids.values() for i in split_ids)
  (devkit / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in all_ids))
  return ids


def make_voc_tar(root, **kwargs) -> dict[str, list[str]]:
  """Writes root/VOCtrainval_11-May-2012.tar (members VOCdevkit/VOC2012/...), like the official.

  kwargs go to make_voc_devkit; returns its ids.
  """
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as scratch:
    ids = make_voc_devkit(scratch, **kwargs)
    with tarfile.open(root / VOC_TAR_NAME, "w") as tar:
      tar.add(pathlib.Path(scratch) / "VOCdevkit", arcname="VOCdevkit")
  return ids


# Non-contiguous ids, listed out of order: class index = 1 + rank of the id.
COCO_FIXTURE_CATEGORIES = ({"id": 18, "name": "dog", "supercategory": "animal"},
                           {"id": 3, "name": "car", "supercategory": "vehicle"},
                           {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                           {"id": 44, "name": "bottle", "supercategory": "kitchen"})


def _rectangle_polygon(top, left, bottom, right) -> list[float]:
  return [left, top, right, top, right, bottom, left, bottom]


def _coco_annotations(rng: np.random.Generator, image_id: int, height: int, width: int,
                      first_id: int, kinds: tuple[str, ...]) -> list[dict]:
  """Annotations of the requested kinds; every kind draws its own random box."""
  annotations = []
  for offset, kind in enumerate(kinds):
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    bottom = int(rng.integers(top + 6, height))
    right = int(rng.integers(left + 6, width))
    if kind == "polygon":  # two parts, as occluded objects have
      mid = (left + right) // 2
      segmentation = [_rectangle_polygon(top, left, bottom, mid - 1),
                      _rectangle_polygon(top, mid + 1, (top + bottom) // 2, right)]
      rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
      box = np.zeros((height, width), np.uint8)
      box[top:bottom, left:right] = 1
      if kind == "triangle_rle":
        box[top:bottom, left:right] = np.tril(np.ones((bottom - top, right - left), np.uint8))
      rle = mask_utils.encode(np.asfortranarray(box))
      if kind in ("rle", "crowd"):  # uncompressed RLE, as COCO stores crowds
        counts, run, previous = [], 0, 0
        for value in box.flatten(order="F"):
          if value != previous:
            counts.append(run)
            run, previous = 0, value
          run += 1
        counts.append(run)
        segmentation = {"size": [height, width], "counts": counts}
      else:  # compressed RLE
        segmentation = {"size": [height, width], "counts": rle["counts"].decode()}
    category = COCO_FIXTURE_CATEGORIES[int(rng.integers(0, len(COCO_FIXTURE_CATEGORIES)))]["id"]
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    annotations.append({"id": first_id + offset, "image_id": image_id, "category_id": category,
                        "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                        "bbox": [x, y, w, h], "iscrowd": int(kind == "crowd")})
  return annotations


_COCO_KINDS = (("polygon", "compressed_rle", "crowd", "rle"),
               ("triangle_rle", "polygon", "polygon"),
               (),  # an image without annotations, as COCO has
               ("crowd", "compressed_rle", "polygon", "triangle_rle", "rle"))


def make_coco(root, *, n_train: int = 2, n_val: int = 4, zipped: bool = True,
              seed: int = 0) -> dict[str, list[str]]:
  """Writes COCO 2017 in the official layout: annotations zip + one image zip per split.

  zipped=False writes the extracted folders (annotations/, train2017/, val2017/) instead.
  Images cycle through annotation kinds: polygons (multi-part), compressed RLE, uncompressed
  RLE, crowds, overlapping instances (larger and smaller), none at all. Category ids are
  non-contiguous (3, 18, 44, 90) and listed out of order. Annotations are written smallest
  first within an image, so a painter that follows file order gets overlaps wrong.

  Returns:
    {"train": ids, "val": ids}: file names without extension, sorted.
  """
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  ids, files, image_serial, annotation_serial = {}, {}, 100, 1000
  for split, count in (("train", n_train), ("val", n_val)):
    images, annotations, files[split] = [], [], {}
    for number in range(count):
      image_serial += 7  # non-contiguous image ids too
      height, width = int(rng.integers(36, 60)), int(rng.integers(36, 60))
      file_name = f"{image_serial:012d}.jpg"
      found = _coco_annotations(rng, image_serial, height, width, annotation_serial,
                                _COCO_KINDS[number % len(_COCO_KINDS)])
      annotation_serial += 10
      annotations += sorted(found, key=lambda a: a["area"])
      pixels = _background(rng, height, width)
      for annotation in found:
        x, y, w, h = (int(v) for v in annotation["bbox"])
        pixels[y:y + h, x:x + w] = (annotation["category_id"] * 53) % 200 + 40
      files[split][f"{split}2017/{file_name}"] = _jpeg(pixels)
      images.append({"id": image_serial, "file_name": file_name, "height": height, "width": width,
                     "license": 1, "coco_url": "", "date_captured": "", "flickr_url": ""})
    files["annotations"] = files.get("annotations", {})
    files["annotations"][f"annotations/instances_{split}2017.json"] = json.dumps({
        "info": {"description": "jaxseg test fixture", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "test", "url": ""}], "images": images,
        "annotations": annotations, "categories": list(COCO_FIXTURE_CATEGORIES)}).encode()
    ids[split] = sorted(name.rsplit(".", 1)[0] for name in (i["file_name"] for i in images))
  archives = {"annotations": "annotations_trainval2017.zip", "train": "train2017.zip",
              "val": "val2017.zip"}
  for key, members in files.items():
    if zipped:
      with zipfile.ZipFile(root / archives[key], "w") as archive:
        for name, data in members.items():
          archive.writestr(name, data)
    else:
      for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
  return ids


# A segment run small enough for tests: random weights, 4 x 4 patches, few CRF iterations.
SMALL_SEGMENT = {"model.weights": "random", "image_size": 56, "batch_size": 2, "method.num_classes": 3,
                 "method.num_categories": 2, "crf.iterations": 5, "gallery_size": 4,
                 "method.sample_budget": 40}  # < the 80 patches: the levels depend on the sampling keys


def segment_config(path, **overrides):
  """A configs/*.py file's config with dotted-name overrides, e.g. segment_config(p, **{"crf.iterations": 2})."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  return override(common.load_config_file(path), **overrides)


def override(config, **overrides):
  """config (a ConfigDict) with dotted-name overrides applied in place, e.g. override(c, **{"crf.iterations": 2})."""
  for name, value in overrides.items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def make_photo_folder(root, sizes: dict[str, tuple[int, int]], *, seed: int = 0) -> pathlib.Path:
  """Writes one JPEG per name (name -> (H, W)) showing rectangles on a gradient, as the VOC fixture draws."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name, (height, width) in sizes.items():
    image, _ = _voc_example(rng, height, width)
    (root / f"{name}.jpg").write_bytes(_jpeg(image))
  return root


def read_pngs(folder) -> dict[str, np.ndarray]:
  """{path relative to folder: PNG pixels (palette indices for palette PNGs)} of every PNG under folder."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): np.array(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def passes_run(workdir) -> set[str]:
  """The passes the latest start of a segment workdir ran (the engine's decisions, manifests/last_start.json)."""
  decisions = json.loads((pathlib.Path(workdir) / "manifests" / "last_start.json").read_text())
  return {name for name, (action, _) in decisions.items() if action != "reuse"}


def assert_same_segmentation(workdir, reference, metric_keys) -> None:
  """Equal masks/ and predictions/ PNGs, and equal metrics.json values under metric_keys."""
  workdir, reference = pathlib.Path(workdir), pathlib.Path(reference)
  for folder in ("masks", "predictions"):
    ours, theirs = read_pngs(workdir / folder), read_pngs(reference / folder)
    assert ours.keys() == theirs.keys(), folder
    for name, image in ours.items():
      np.testing.assert_array_equal(image, theirs[name], err_msg=f"{folder}/{name}")
  ours, theirs = (json.loads((w / "metrics.json").read_text()) for w in (workdir, reference))
  for key in metric_keys:
    assert ours.get(key) == theirs.get(key), key

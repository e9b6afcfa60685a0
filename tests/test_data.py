"""Data: VOC/COCO builders against the fixture files, folders, sample photos, batches."""

import io
import json
import pathlib
import re
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import jaxseg.data
import fixtures

# pycocotools' own numpy-2 deprecation noise, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ROOT = pathlib.Path(__file__).resolve().parents[1]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _pil_rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _palette_indices(data: bytes) -> np.ndarray:
  """Label PNG -> indices by looking each pixel's colour up in the VOC colour map."""
  colours = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int64)
  palette = np.asarray(fixtures.voc_palette(), np.int64).reshape(256, 3)
  codes = palette @ np.array([65536, 256, 1])
  lookup = {code: index for index, code in reversed(list(enumerate(codes)))}
  return np.vectorize(lookup.__getitem__)(colours @ np.array([65536, 256, 1])).astype(np.uint8)


def _prepared(tmp_path_factory, name: str, make_fixture):
  """(root, fixture ids, {split: source}) for a dataset written by make_fixture(root/manual)."""
  root = tmp_path_factory.mktemp(name)
  ids = make_fixture(root / "manual")
  splits = {split: jaxseg.data.load(name, split, data_dir=root / "data", manual_dir=root / "manual")
            for split in ("train", "val")}
  return root, ids, splits


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  return _prepared(tmp_path_factory, "voc_seg", fixtures.make_voc_tar)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  return _prepared(tmp_path_factory, "coco_object", fixtures.make_coco)


def test_voc_matches_tar_files(voc):
  root, ids, splits = voc
  with tarfile.open(root / "manual" / fixtures.VOC_TAR_NAME) as tar:
    def member(path):
      return tar.extractfile(f"VOCdevkit/VOC2012/{path}").read()
    for split, source in splits.items():
      assert [source[i]["id"] for i in range(len(source))] == sorted(ids[split])
      for i in range(len(source)):
        item = source[i]
        np.testing.assert_array_equal(item["image"], _pil_rgb(member(f"JPEGImages/{item['id']}.jpg")))
        expected = _palette_indices(member(f"SegmentationClass/{item['id']}.png"))
        assert item["mask"].dtype == np.uint8 and item["image"].dtype == np.uint8
        np.testing.assert_array_equal(item["mask"], expected)
  all_masks = np.concatenate([s[i]["mask"].ravel() for s in splits.values() for i in range(len(s))])
  assert 255 in all_masks and set(np.unique(all_masks)) <= set(range(21)) | {255}
  assert not set(ids["detection_only"]) & {s[i]["id"] for s in splits.values() for i in range(len(s))}


def test_voc_stores_original_jpeg_bytes(voc):
  root, ids, _ = voc
  builder = jaxseg.data.VocSeg(config="2012", data_dir=str(root / "data"), file_format="array_record")
  records = builder.as_data_source(split="val")
  with tarfile.open(root / "manual" / fixtures.VOC_TAR_NAME) as tar:
    for i in range(len(records)):
      image_id = records[i]["id"].decode()
      assert records[i]["image"] == tar.extractfile(f"VOCdevkit/VOC2012/JPEGImages/{image_id}.jpg").read()


def test_voc_extracted_devkit(tmp_path):
  ids = fixtures.make_voc_devkit(tmp_path / "manual", n_train=1, n_val=2)
  source = jaxseg.data.load("voc_seg", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  assert [source[i]["id"] for i in range(len(source))] == sorted(ids["val"])
  assert source[0]["image"].flags.writeable and source[0]["mask"].flags.writeable
  devkit = tmp_path / "manual" / "VOCdevkit" / "VOC2012"
  np.testing.assert_array_equal(source[-1]["mask"], _palette_indices(
      (devkit / "SegmentationClass" / f"{source[-1]['id']}.png").read_bytes()))


def _expected_coco_mask(coco_api: COCO, image_id: int) -> np.ndarray:
  """Per pixel: the category of the smallest covering non-crowd instance, else 255 under a crowd."""
  info = coco_api.imgs[image_id]
  class_of = {3: 1, 18: 2, 44: 3, 90: 4}  # 1 + rank of the fixture's ids
  annotations = coco_api.loadAnns(coco_api.getAnnIds(imgIds=[image_id]))
  expected = np.zeros((info["height"], info["width"]), np.uint8)
  things = [a for a in annotations if not a["iscrowd"]]
  crowd = np.zeros_like(expected, bool)
  for a in annotations:
    if a["iscrowd"]:
      crowd |= coco_api.annToMask(a).astype(bool)
  if things:
    covers = np.stack([coco_api.annToMask(a).astype(bool) for a in things])
    areas = np.array([a["area"] for a in things])
    smallest = np.argmin(np.where(covers, areas[:, None, None], np.inf), axis=0)
    labels = np.array([class_of[a["category_id"]] for a in things], np.uint8)
    expected = np.where(covers.any(0), labels[smallest], 0).astype(np.uint8)
    crowd &= ~covers.any(0)
  expected[crowd] = 255
  return expected


def test_coco_matches_independent_painting(coco):
  root, ids, splits = coco
  with zipfile.ZipFile(root / "manual" / "annotations_trainval2017.zip") as archive:
    jsons = {s: json.loads(archive.read(f"annotations/instances_{s}2017.json")) for s in splits}
  kinds_seen = set()
  for split, source in splits.items():
    coco_api = COCO()
    coco_api.dataset = jsons[split]
    coco_api.createIndex()
    by_name = {i["file_name"]: i["id"] for i in jsons[split]["images"]}
    assert [source[i]["id"] for i in range(len(source))] == ids[split]
    with zipfile.ZipFile(root / "manual" / f"{split}2017.zip") as archive:
      for i in range(len(source)):
        item = source[i]
        name = f"{item['id']}.jpg"
        np.testing.assert_array_equal(item["image"], _pil_rgb(archive.read(f"{split}2017/{name}")))
        np.testing.assert_array_equal(item["mask"], _expected_coco_mask(coco_api, by_name[name]))
        kinds_seen |= set(np.unique(item["mask"]).tolist())
  assert {0, 255} <= kinds_seen and len(kinds_seen - {0, 255}) >= 3


def test_coco_overlap_smaller_wins_where_file_order_would_lose(coco):
  """The fixture writes smaller instances first: painting in file order would differ here."""
  root, _, splits = coco
  with zipfile.ZipFile(root / "manual" / "annotations_trainval2017.zip") as archive:
    dataset = json.loads(archive.read("annotations/instances_val2017.json"))
  first = dataset["images"][1]
  annotations = [a for a in dataset["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"]]
  naive = np.zeros((first["height"], first["width"]), np.uint8)
  for a in annotations:  # file order: smallest first, so larger ones overwrite it
    naive[jaxseg.data.coco.instance_mask(a, first["height"], first["width"])] = 1 + sorted(
        [3, 18, 44, 90]).index(a["category_id"])
  assert not np.array_equal(splits["val"][1]["mask"], naive)


def test_coco_extracted_folders_match_zips(coco, tmp_path):
  _, ids, splits = coco
  fixtures.make_coco(tmp_path / "manual", zipped=False)
  source = jaxseg.data.load("coco_object", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  assert len(source) == len(ids["val"])
  for i in range(len(source)):
    np.testing.assert_array_equal(source[i]["mask"], splits["val"][i]["mask"])
    np.testing.assert_array_equal(source[i]["image"], splits["val"][i]["image"])


def test_tensorflow_never_imported(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(ROOT / 'tests')!r})
      import fixtures, jaxseg.data
      fixtures.make_voc_tar({str(tmp_path / 'voc')!r}, n_train=1, n_val=1)
      fixtures.make_coco({str(tmp_path / 'coco')!r}, n_train=1, n_val=1)
      for name, manual in (("voc_seg", "voc"), ("coco_object", "coco")):
        source = jaxseg.data.load(name, "val", data_dir={str(tmp_path / 'data')!r},
                                  manual_dir={str(tmp_path)!r} + "/" + manual)
        next(iter(jaxseg.data.batches(source, batch_size=2, image_size=28, patch_size=14)))
        assert source[0]["mask"].ndim == 2
      print("tensorflow" in sys.modules, [m for m in sys.modules if m.startswith("tensorflow.")][:3])
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "False []", out.stdout


def test_voc_missing_mask_names_file(tmp_path):
  ids = fixtures.make_voc_devkit(tmp_path / "manual", n_train=2, n_val=1)
  missing = tmp_path / "manual" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{ids['train'][1]}.png"
  missing.unlink()
  with pytest.raises(FileNotFoundError, match=str(missing)):
    jaxseg.data.load("voc_seg", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_voc_corrupt_jpeg_names_file_and_rebuilds_after_fix(tmp_path):
  ids = fixtures.make_voc_devkit(tmp_path / "manual", n_train=2, n_val=1)
  jpeg = tmp_path / "manual" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{ids['val'][0]}.jpg"
  good = jpeg.read_bytes()
  jpeg.write_bytes(good[:len(good) // 2])
  with pytest.raises(ValueError, match=f"Corrupt.*{jpeg}"):
    jaxseg.data.load("voc_seg", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  jpeg.write_bytes(good)  # the failed build left nothing that passes for a prepared dataset
  source = jaxseg.data.load("voc_seg", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  np.testing.assert_array_equal(source[0]["image"], _pil_rgb(good))


def test_coco_annotation_for_unknown_image(tmp_path):
  fixtures.make_coco(tmp_path / "manual", n_train=1, n_val=2, zipped=False)
  path = tmp_path / "manual" / "annotations" / "instances_val2017.json"
  dataset = json.loads(path.read_text())
  dataset["annotations"][0]["image_id"] = 999999
  path.write_text(json.dumps(dataset))
  bad_id = dataset["annotations"][0]["id"]
  with pytest.raises(ValueError, match=f"annotation {bad_id} .*unknown image id 999999"):
    jaxseg.data.load("coco_object", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


@pytest.mark.parametrize("name, expected", [("voc_seg", "VOCtrainval_11-May-2012.tar"),
                                            ("coco_object", "annotations_trainval2017.zip")])
def test_wrong_manual_dir_lists_expectations(tmp_path, name, expected):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "stray.zip").write_bytes(b"not the dataset")
  with pytest.raises(ValueError, match=expected) as error:
    jaxseg.data.load(name, "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  assert "stray.zip" in str(error.value)
  with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
    jaxseg.data.load(name, "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "absent")


def test_coco_split_without_images_is_not_built(tmp_path):
  fixtures.make_coco(tmp_path / "manual", n_train=1, n_val=1, zipped=False)
  for path in (tmp_path / "manual" / "train2017").iterdir():
    path.unlink()
  (tmp_path / "manual" / "train2017").rmdir()
  source = jaxseg.data.load("coco_object", "val", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  assert len(source) == 1
  with pytest.raises(ValueError, match="splits \\['val'\\], not 'train'"):
    jaxseg.data.load("coco_object", "train", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
  with pytest.raises(ValueError, match="Unknown dataset 'voc'"):
    jaxseg.data.load("voc", "val", data_dir=tmp_path / "data")


def _save(path: pathlib.Path, image: Image.Image, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)


def test_folder_awkward_images(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (12, 20, 3), np.uint8)
  gray = rng.integers(0, 256, (10, 8), np.uint8)
  wide = rng.integers(0, 65536, (9, 7), np.uint16)
  indices = rng.integers(0, 4, (6, 5), np.uint8)
  palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (768 - 12)
  _save(tmp_path / "b" / "gray.png", Image.fromarray(gray))
  _save(tmp_path / "a_rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]]), mode="RGBA"))
  pal = Image.fromarray(indices, mode="P")
  pal.putpalette(palette)
  _save(tmp_path / "b" / "c" / "pal.bmp", pal)
  _save(tmp_path / "deep16.png", Image.fromarray(wide))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  _save(tmp_path / "photo.JPG", Image.fromarray(rgb), exif=exif, quality=95)
  (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  (tmp_path / "notes.txt").write_text("not an image")
  with pytest.warns(UserWarning, match="broken.jpg"):
    source = jaxseg.data.load("folder:" + str(tmp_path), None, data_dir=tmp_path / "unused")
  items = {source[i]["id"]: source[i] for i in range(len(source))}
  assert [source[i]["id"] for i in range(len(source))] == ["a_rgba", "b/c/pal", "b/gray", "deep16", "photo"]
  assert all(item["image"].dtype == np.uint8 and item["image"].shape[2] == 3 and "mask" not in item
             for item in items.values())
  np.testing.assert_array_equal(items["a_rgba"]["image"], rgb)
  np.testing.assert_array_equal(items["b/gray"]["image"], np.stack([gray] * 3, -1))
  np.testing.assert_array_equal(items["b/c/pal"]["image"],
                                np.array(palette[:12], np.uint8).reshape(4, 3)[indices])
  np.testing.assert_array_equal(items["deep16"]["image"],
                                np.stack([np.round(wide / 257.0).astype(np.uint8)] * 3, -1))
  stored = np.asarray(Image.open(tmp_path / "photo.JPG").convert("RGB"))
  np.testing.assert_array_equal(items["photo"]["image"], np.rot90(stored, k=-1))


def test_folder_ids_keep_extension_only_on_collision(tmp_path):
  for name in ("x.png", "x.jpg", "y.png"):
    _save(tmp_path / name, Image.new("RGB", (4, 4)))
  source = jaxseg.data.load("folder:" + str(tmp_path), None, data_dir=tmp_path)
  assert source.ids == ["x.jpg", "x.png", "y"]


def test_skimage_photos_written_once(tmp_path):
  from skimage import data as skimage_data
  source = jaxseg.data.load("skimage", None, data_dir=tmp_path)
  ids = [source[i]["id"] for i in range(len(source))]
  assert {"astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"} <= set(ids)
  np.testing.assert_array_equal(source[ids.index("astronaut")]["image"], skimage_data.astronaut())
  written = (tmp_path / "skimage_photos" / "astronaut.png").stat().st_mtime_ns
  jaxseg.data.load("skimage", None, data_dir=tmp_path)
  assert (tmp_path / "skimage_photos" / "astronaut.png").stat().st_mtime_ns == written
  assert not list((tmp_path / "skimage_photos").glob("*.tmp"))


def test_class_names():
  voc_names, coco_names = jaxseg.data.class_names("voc_seg"), jaxseg.data.class_names("coco_object")
  assert len(voc_names) == 21 and voc_names[0] == "background" and voc_names[15] == "person"
  assert len(coco_names) == 81 and coco_names[1] == "person" and coco_names[80] == "toothbrush"
  assert coco_names[12] == "stop sign"  # id 13: the first after COCO's gap at 12


def _memory_source(count: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"id": f"img{i}", "image": rng.integers(0, 256, (int(rng.integers(9, 30)), int(rng.integers(9, 30)), 3),
                                                  np.uint8)} for i in range(count)]


def test_batches_shapes_padding_and_normalisation():
  source = _memory_source(5)
  out = list(jaxseg.data.batches(source, batch_size=2, image_size=14, patch_size=7))
  assert len(out) == 3
  for batch in out:
    assert batch["image"].shape == (2, 14, 14, 3) and batch["image"].dtype == np.float32
    assert batch["valid"].dtype == bool and batch["size"].dtype == np.int32
    assert batch["index"].dtype == np.int64 and len(batch["id"]) == 2
  last = out[-1]
  assert last["valid"].tolist() == [True, False] and last["id"] == ["img4", ""]
  assert last["index"].tolist() == [4, -1] and last["size"][1].tolist() == [0, 0]
  assert not last["image"][1].any()
  for batch in out:
    for slot in np.flatnonzero(batch["valid"]):
      original = source[batch["index"][slot]]["image"]
      resized = np.asarray(Image.fromarray(original).resize((14, 14), Image.BICUBIC), np.float64)
      np.testing.assert_allclose(batch["image"][slot], (resized / 255.0 - MEAN) / STD, atol=1e-5)
      assert batch["size"][slot].tolist() == list(original.shape[:2])


def test_normalize_images_numpy_and_jax_agree():
  import jax.numpy as jnp
  pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), np.uint8)
  expected = (pixels / 255.0 - MEAN) / STD
  np.testing.assert_allclose(jaxseg.data.normalize_images(pixels), expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jaxseg.data.normalize_images(jnp.asarray(pixels))), expected, atol=1e-6)


def test_prepare_images_is_pil_bicubic_then_imagenet_normalisation():
  rng = np.random.default_rng(0)
  photos = [rng.integers(0, 256, shape, np.uint8) for shape in ((30, 45, 3), (16, 16, 3), (9, 70, 3))]
  batch = jaxseg.data.prepare_images(photos, 28)
  assert batch.shape == (3, 28, 28, 3) and batch.dtype == np.float32
  for photo, prepared in zip(photos, batch):
    resized = np.asarray(Image.fromarray(photo).resize((28, 28), Image.BICUBIC), np.float64)
    np.testing.assert_allclose(prepared, (resized / 255.0 - MEAN) / STD, atol=1e-5)
  for bad, shown in ((photos[0][..., :2], "uint8 [30, 45, 2]"), (photos[1].astype(np.float32), "float32")):
    with pytest.raises(ValueError, match=rf"photos\[1\] must be uint8 \[H, W, 3\].*{re.escape(shown)}"):
      jaxseg.data.prepare_images([photos[0], bad], 28)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_cover_subset_exactly_once(count):
  source = _memory_source(11)
  subset = [10, 3, 4, 7, 0, 9, 5]
  seen, lengths = [], set()
  for index in range(count):
    out = list(jaxseg.data.batches(source, batch_size=2, image_size=7, patch_size=7,
                                   shard=(index, count), indices=subset))
    lengths.add(len(out))
    for batch in out:
      seen += batch["index"][batch["valid"]].tolist()
      assert [batch["id"][s] for s in np.flatnonzero(batch["valid"])] == [
          f"img{i}" for i in batch["index"][batch["valid"]]]
  assert sorted(seen) == sorted(subset) and len(lengths) == 1
  if count == 1:
    assert seen == subset


def test_batches_bad_arguments():
  with pytest.raises(ValueError, match="multiple of patch_size 14"):
    jaxseg.data.batches(_memory_source(2), batch_size=2, image_size=30, patch_size=14)
  with pytest.raises(ValueError, match="shard"):
    jaxseg.data.batches(_memory_source(2), batch_size=2, image_size=28, patch_size=14, shard=(2, 2))


class _FailingSource:
  def __init__(self, count, fail_at, delay=0.0):
    self.items, self.fail_at, self.delay = _memory_source(count), fail_at, delay

  def __len__(self):
    return len(self.items)

  def __getitem__(self, index):
    time.sleep(self.delay)
    if index == self.fail_at:
      raise OSError(f"disk error at {index}")
    return self.items[index]


def test_batches_propagate_worker_errors():
  iterator = jaxseg.data.batches(_FailingSource(6, fail_at=3), batch_size=2, image_size=7, patch_size=7)
  assert next(iterator)["valid"].all()
  with pytest.raises(OSError, match="disk error at 3"):
    list(iterator)


def test_batches_early_exit_does_not_hang():
  iterator = jaxseg.data.batches(_FailingSource(400, fail_at=-1, delay=0.5), batch_size=4,
                                 image_size=7, patch_size=7, prefetch=8, num_workers=2)
  next(iterator)
  closer = threading.Thread(target=iterator.close)
  closer.start()
  closer.join(timeout=30)
  assert not closer.is_alive()
  # Pending items were cancelled: the workers finish their current item and exit.
  for _ in range(30):  # without cancelling, 36 queued items would keep them busy for 9 s
    workers = [t for t in threading.enumerate() if t.name.startswith("jaxseg-batches")]
    if not workers:
      break
    time.sleep(0.1)
  assert not workers

"""Image folders as sources, and the scikit-image sample photographs written as a folder."""

import collections
import os
import pathlib
import warnings

import numpy as np
from PIL import Image

from jaxseg import _files
from jaxseg.data import images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Colour photographs bundled with scikit-image (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")


def _is_readable_image(path: pathlib.Path) -> bool:
  """Whether PIL decodes the file: a truncated or corrupt image is not readable, as an empty or foreign one.

  JPEGs decode at their smallest scale (draft mode), which still reads every byte of their data.
  """
  try:
    with Image.open(path) as image:
      image.draft("RGB", (1, 1))
      image.load()
      return image.width > 0 and image.height > 0
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return False


class FolderSource(images.ImageSource):
  """Every image file under a folder, recursively, sorted by relative path.

  Items are {"id": relative path without extension ('/'-separated), "image": uint8 [H, W, 3]}
  with EXIF orientation applied. Files PIL cannot decode (empty, foreign, truncated, corrupt) are
  skipped with a warning naming them and listed in `skipped`; a file that fails later (changed
  since) raises ValueError naming it. Two files differing only in extension (a.jpg, a.png) keep
  their extensions in their ids.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f"Image folder {self.root} does not exist or is not a directory.")
    candidates = sorted((p for p in self.root.rglob("*")
                         if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                        key=lambda p: p.relative_to(self.root).as_posix())
    self.paths, self.skipped = [], []
    for path in candidates:
      if _is_readable_image(path):
        self.paths.append(path)
      else:
        self.skipped.append(path)
        warnings.warn(f"Skipping unreadable image file {path}", stacklevel=2)
    stems = [p.relative_to(self.root).with_suffix("").as_posix() for p in self.paths]
    counts = collections.Counter(stems)
    self.ids = [stem if counts[stem] == 1 else p.relative_to(self.root).as_posix()
                for stem, p in zip(stems, self.paths)]

  def __len__(self) -> int:
    return len(self.paths)

  def _open(self, index: int):
    path = self.paths[index]
    return self.ids[index], images.open_rgb(path.read_bytes(), name=str(path), apply_exif=True), {}


def skimage_photos(data_dir: str | os.PathLike) -> pathlib.Path:
  """Writes scikit-image's bundled colour photographs as PNGs into data_dir/skimage_photos.

  Each file is written once, atomically (temp file + os.replace) with the umask's mode, and
  reused afterwards.
  Returns the folder.
  """
  from skimage import data as skimage_data  # imported lazily: only this source needs it

  folder = pathlib.Path(data_dir) / "skimage_photos"
  folder.mkdir(parents=True, exist_ok=True)
  for name in SKIMAGE_PHOTOS:
    target = folder / f"{name}.png"
    if target.exists():
      continue
    if name.startswith("motorcycle_"):
      left, right, _ = skimage_data.stereo_motorcycle()
      photo = left if name == "motorcycle_left" else right
    else:
      photo = getattr(skimage_data, name)()
    _files.atomic_write_bytes(target, images.encode_png(np.ascontiguousarray(photo[..., :3], dtype=np.uint8)))
  return folder

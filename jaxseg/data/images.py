"""Decoding image bytes to RGB with PIL, checking them, resizing; the base of PIL-decoded sources."""

import io
import operator

import numpy as np
from PIL import Image
from PIL import ImageOps

# Modes holding 16- or 32-bit integer samples: PIL's convert("RGB") would clip them at 255.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _as_rgb(image: Image.Image) -> Image.Image:
  """PIL image in any mode -> mode "RGB"; alpha is dropped, as `convert("RGB")` does."""
  if image.mode == "RGB":
    return image
  if image.mode not in _WIDE_INTEGER_MODES + ("F",):
    return image.convert("RGB")
  values = np.asarray(image, dtype=np.float64)
  if image.mode != "F":  # 16-bit samples: x * 255 / 65535, rounded; convert() would clip
    values = values * (255.0 / 65535.0)
  gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
  return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))


def open_rgb(data: bytes, *, name: str, apply_exif: bool = False) -> Image.Image:
  """Decodes encoded image bytes to a loaded PIL image in mode "RGB".

  Args:
    data: the file's bytes (JPEG, PNG, BMP, WebP, TIFF, ...).
    name: file name used in the error message.
    apply_exif: rotate/flip by the EXIF orientation tag (photos from folders). Dataset images
      are decoded as stored, since their annotations are drawn on the stored pixel grid.

  Grayscale, palette, CMYK and 16-bit images are converted to RGB; alpha is dropped.

  Raises:
    ValueError naming the file if the bytes cannot be decoded.
  """
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    if apply_exif:
      image = ImageOps.exif_transpose(image)
    return _as_rgb(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise ValueError(f"Cannot decode image {name}: {error}") from error


def resize(image: Image.Image, image_size: int) -> np.ndarray:
  """RGB PIL image -> uint8 [S, S, 3], PIL bicubic (antialiased when shrinking)."""
  return np.asarray(image.resize((image_size, image_size), Image.BICUBIC))


class ImageSource:
  """Base of sources whose items are decoded with PIL.

  Subclasses implement `__len__` and `_open(index) -> (id, RGB PIL image, extra fields)`.
  `[i]` gives {"id", "image": uint8 [H, W, 3], **extra}; `resized_item(i, S)` gives the image
  already resized to [S, S, 3] plus "size" (H, W), skipping an array round trip.
  """

  def __len__(self) -> int:
    raise NotImplementedError

  def _open(self, index: int) -> tuple[str, Image.Image, dict]:
    raise NotImplementedError

  def _checked(self, index) -> int:
    index = operator.index(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} out of range for a source of length {len(self)}.")
    return index

  def __getitem__(self, index: int) -> dict:
    image_id, image, extra = self._open(self._checked(index))
    return {"id": image_id, "image": np.array(image), **extra}  # writeable, unlike asarray

  def resized_item(self, index: int, image_size: int) -> dict:
    image_id, image, extra = self._open(self._checked(index))
    return {"id": image_id, "image": resize(image, image_size), "size": (image.height, image.width),
            **extra}


def check_image(data: bytes, *, name: str, size_hw: tuple[int, int] | None = None) -> tuple[int, int]:
  """Checks that bytes decode completely (at reduced scale, for speed) and returns (H, W).

  Args:
    data: encoded image bytes.
    name: file name used in the error message.
    size_hw: if given, the (H, W) the image must have (e.g. its mask's size).

  Raises:
    ValueError naming the file if it is truncated, not an image, or of the wrong size.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      height, width = image.height, image.width
      # JPEG decoding at 1/8 scale still reads every entropy-coded byte, so truncation is caught.
      image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
      image.load()
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    raise ValueError(f"Corrupt or unreadable image {name}: {error}") from error
  if size_hw is not None and (height, width) != tuple(size_hw):
    raise ValueError(f"Image {name} is {height}x{width} (HxW) but its annotation is "
                     f"{size_hw[0]}x{size_hw[1]}.")
  return height, width


def decode_index_png(data: bytes, *, name: str) -> np.ndarray:
  """Decodes a label PNG to uint8 [H, W] class indices.

  Palette ("P") PNGs give their palette indices, never their colours; grayscale ("L") PNGs give
  their values. Any other mode is refused, since its values would be colours, not classes.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode not in ("P", "L"):
        raise ValueError(f"mode {image.mode!r}; expected a palette ('P') or grayscale ('L') PNG")
      return np.asarray(image, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as error:
    raise ValueError(f"Cannot decode label mask {name}: {error}") from error


def encode_png(array: np.ndarray) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes (lossless)."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()

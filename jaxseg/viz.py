"""Palettes, overlays and galleries: numpy arrays and strings in, no files written."""

import base64
import html
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np


def voc_palette(size: int = 256) -> np.ndarray:
  """[size, 3] uint8 PASCAL VOC colormap: bits of the label spread over the RGB high bits.

  0 = black background, 255 = (224, 224, 192) void/ignore.
  """
  palette = np.zeros((size, 3), np.uint8)
  for label in range(size):
    value, red, green, blue = label, 0, 0, 0
    for shift in range(7, -1, -1):
      red |= (value & 1) << shift
      green |= ((value >> 1) & 1) << shift
      blue |= ((value >> 2) & 1) << shift
      value >>= 3
    palette[label] = red, green, blue
  return palette


VOC_PALETTE = voc_palette()


def colorize(labels: np.ndarray, palette: np.ndarray = VOC_PALETTE) -> np.ndarray:
  """[H, W, 3] uint8 colours of a label map labels: [H, W] int in [0, len(palette))."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= len(palette)):
    raise ValueError(f"colorize: labels span [{labels.min()}, {labels.max()}], palette has {len(palette)} entries")
  return np.asarray(palette, np.uint8)[labels]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5,
            palette: np.ndarray = VOC_PALETTE) -> np.ndarray:
  """Blends label colours over an image where labels != 0 (background shows the image).

  Args:
    image: [H, W, 3] uint8 RGB, or [H, W] grayscale.
    labels: [H, W] int label map of the same size.
    alpha: weight of the label colour, in [0, 1].
    palette: [L, 3] uint8.

  Returns:
    [H, W, 3] uint8.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[:2] != np.shape(labels) or image.shape[-1] != 3:
    raise ValueError(f"overlay: image {image.shape} and labels {np.shape(labels)} must be [H, W, 3] and [H, W]")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"overlay: alpha={alpha} must be in [0, 1]")
  colours = colorize(labels, palette).astype(np.float32)
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
  blended = np.where((np.asarray(labels) != 0)[..., None], blended, image)
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# Background (label 0) in galleries: a neutral grey, so that solid label colours stand out and black
# (VOC's background colour) is not mistaken for a dark class.
NEUTRAL = (208, 208, 208)
# Each panel is shown this large on its longer side, whatever the size of its file.
PANEL_SIDE = 480


def gallery_palette(palette: np.ndarray = VOC_PALETTE) -> np.ndarray:
  """[L, 3] uint8: palette with entry 0 (background) replaced by NEUTRAL, for solid label panels."""
  palette = np.array(palette, np.uint8)
  palette[0] = NEUTRAL
  return palette


class GalleryRow(NamedTuple):
  """One image of a gallery.

  Attributes:
    id: image id, shown as the row title.
    score: the ordering key of worst_first, e.g. per-image IoU in [0, 1]; None if unknown.
    images: one entry per column: PNG bytes (embedded) or a file name relative
      to the HTML file (linked).
    notes: lines shown under the id, e.g. ("foreground 51.2%", "IoU 43.0%").
  """
  id: str
  score: float | None
  images: Sequence[bytes | str]
  notes: Sequence[str] = ()


def _source(image: bytes | str) -> str:
  if isinstance(image, bytes):
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")
  return html.escape(image, quote=True)


def _legend_html(legend: Sequence[tuple[int, str]], palette: np.ndarray) -> str:
  items = []
  for label, name in legend:
    red, green, blue = (int(c) for c in np.asarray(palette, np.uint8)[label])
    items.append(f'<li data-label="{int(label)}"><span class="swatch" style="background:rgb({red},{green},{blue})">'
                 f"</span>{int(label)}: {html.escape(name)}</li>")
  return '<h2>Legend</h2>\n<ul class="legend">' + "".join(items) + "</ul>\n"


_STYLE = ("body{font-family:sans-serif;background:#fff}"
          f"img{{width:{PANEL_SIDE}px;height:{PANEL_SIDE}px;object-fit:contain;image-rendering:pixelated}}"
          "td,th{padding:4px;vertical-align:top;text-align:left}.notes{font-weight:normal}"
          ".banner{background:#b00;color:#fff;padding:8px;font-weight:bold}"
          ".legend{list-style:none;padding:0}.legend li{display:inline-block;margin-right:16px}"
          ".swatch{display:inline-block;width:18px;height:18px;margin-right:4px;border:1px solid #444;"
          "vertical-align:middle}")


def gallery_html(rows: Iterable[GalleryRow], columns: Sequence[str] = ("image", "prediction", "ground truth"), *,
                 title: str = "jaxseg gallery", worst_first: bool = True, legend: Sequence[tuple[int, str]] = (),
                 banner: str | None = None, palette: np.ndarray = VOC_PALETTE) -> str:
  """A self-contained HTML page showing each row's images side by side, each PANEL_SIDE px on its longer side.

  Args:
    rows: GalleryRow per image, each with len(columns) images.
    columns: column headings.
    title: page title.
    worst_first: order rows by ascending score (None last, ties by id);
      False keeps the given order.
    legend: (palette index, name) pairs, listed as "index: name" with the
      palette colour (e.g. (0, "background"), (15, "person")).
    banner: a warning shown in red above everything (e.g. random weights).
    palette: [L, 3] uint8 colours of the legend's entries.

  Returns:
    The HTML document.
  """
  rows = list(rows)
  for row in rows:
    if len(row.images) != len(columns):
      raise ValueError(f"gallery_html: row {row.id!r} has {len(row.images)} images for {len(columns)} columns")
  if worst_first:
    rows.sort(key=lambda r: (r.score is None, r.score if r.score is not None else 0.0, str(r.id)))
  head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
  body = []
  for row in rows:
    notes = "".join(f'<br><span class="notes">{html.escape(note)}</span>' for note in row.notes)
    cells = "".join(f'<td><img src="{_source(image)}" alt="{html.escape(column, quote=True)}"></td>'
                    for image, column in zip(row.images, columns))
    body.append(f"<tr><th>{html.escape(str(row.id))}{notes}</th>{cells}</tr>")
  return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
          f"<style>{_STYLE}</style></head>\n<body>"
          + (f'<div class="banner">{html.escape(banner)}</div>\n' if banner else "")
          + f"<h1>{html.escape(title)}</h1>\n" + (_legend_html(legend, palette) if legend else "")
          + f"<table>\n<tr><th>id</th>{head}</tr>\n"
          + "\n".join(body) + "\n</table></body></html>\n")

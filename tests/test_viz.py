"""Palette against the published VOC colours; overlays and the gallery page."""

import base64

import numpy as np
import pytest

from jaxseg import viz

# Colours of VOC2012 SegmentationClass PNGs: background, aeroplane, bicycle, bird, boat, person, tvmonitor, void.
KNOWN = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 15: (192, 128, 128),
         20: (0, 64, 128), 255: (224, 224, 192)}


def test_voc_palette_matches_published_colours():
  palette = viz.voc_palette()
  assert palette.shape == (256, 3) and palette.dtype == np.uint8
  for label, colour in KNOWN.items():
    assert tuple(palette[label]) == colour, label
  assert len({tuple(c) for c in palette}) == 256


def test_colorize_and_overlay():
  labels = np.array([[0, 1], [15, 255]])
  np.testing.assert_array_equal(viz.colorize(labels), [[KNOWN[0], KNOWN[1]], [KNOWN[15], KNOWN[255]]])
  image = np.full((2, 2, 3), 100, np.uint8)
  blended = viz.overlay(image, labels, alpha=0.25)
  assert tuple(blended[0, 0]) == (100, 100, 100)  # background shows the image
  assert tuple(blended[0, 1]) == (107, 75, 75)  # 0.75 * 100 + 0.25 * (128, 0, 0)
  assert viz.overlay(image[..., 0], labels).shape == (2, 2, 3)
  with pytest.raises(ValueError, match="labels span"):
    viz.colorize(np.array([256]))
  with pytest.raises(ValueError, match="overlay"):
    viz.overlay(image, labels[:1])


def test_gallery_orders_worst_first_and_embeds_or_links():
  png = b"\x89PNG fake"
  rows = [viz.GalleryRow("good", 0.9, ["a.png", png], ["IoU 90.0%"]), viz.GalleryRow("<bad>", 0.1, ["b.png", png]),
          viz.GalleryRow("no-gt", None, ["c.png", png], ["foreground 5.0%", "<b>"])]
  page = viz.gallery_html(rows, columns=("image", "prediction"))
  assert page.index("&lt;bad&gt;") < page.index("good") < page.index("no-gt")
  assert "<bad>" not in page and "<b>" not in page
  assert 'src="a.png"' in page and base64.b64encode(png).decode() in page
  assert page.index("good") < page.index("IoU 90.0%") < page.index("no-gt") < page.index("foreground 5.0%")
  given = viz.gallery_html(rows, columns=("image", "prediction"), worst_first=False)
  assert given.index("good") < given.index("&lt;bad&gt;")
  with pytest.raises(ValueError, match="columns"):
    viz.gallery_html(rows)


def test_gallery_palette_shows_background_grey():
  palette = viz.gallery_palette()
  assert tuple(palette[0]) == viz.NEUTRAL and len(set(viz.NEUTRAL)) == 1  # grey: no hue to read as a class
  assert tuple(map(tuple, palette[1:])) == tuple(map(tuple, viz.VOC_PALETTE[1:]))
  assert viz.NEUTRAL not in {tuple(c) for c in viz.VOC_PALETTE}
  assert tuple(viz.VOC_PALETTE[0]) == (0, 0, 0)  # the module's palette is left as VOC's


def test_gallery_legend_and_banner():
  png = b"\x89PNG fake"
  rows = [viz.GalleryRow("a", None, [png])]
  page = viz.gallery_html(rows, columns=("prediction",), legend=[(1, "cluster 0"), (15, "<person>")],
                          banner="model.weights=random: meaningless masks")
  assert page.index('class="banner"') < page.index("<h1>") < page.index('class="legend"') < page.index("<table>")
  assert "meaningless masks" in page
  assert 'data-label="15"' in page and "rgb(192,128,128)" in page and "&lt;person&gt;" in page  # VOC colour 15
  assert "rgb(128,0,0)" in page and "cluster 0" in page  # VOC colour 1
  plain = viz.gallery_html(rows, columns=("prediction",))
  assert 'class="banner"' not in plain and 'class="legend"' not in plain

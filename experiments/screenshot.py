r"""Headless Chromium pictures of a gallery page, and the README's demo-gallery screenshot (docs/gallery.png).

  python -m experiments.screenshot --output=docs/gallery.png

runs the demo (configs/demo.py) with random weights, as the README's offline smoke run does, into a
temporary workdir, and keeps the top of its gallery.html (banner, legend, the first rows) as a small
PNG. Needs Debian's `chromium` (apt-get install chromium); tests/test_gallery.py uses the same
functions to check what a person sees.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
from absl import app
from absl import flags

from experiments import errors

BROWSER = "chromium"
_OUTPUT = flags.DEFINE_string("output", "docs/gallery.png", "Where to write the screenshot (PNG).")
# Reads back where each element of interest was laid out: the same flags give the screenshot the same layout.
_BOXES_SCRIPT = """<script>
window.addEventListener("load", () => {
  const boxes = {};
  for (const [name, selector] of Object.entries(%s)) {
    boxes[name] = [...document.querySelectorAll(selector)].map(e => {
      const r = e.getBoundingClientRect();
      return [Math.round(r.left + scrollX), Math.round(r.top + scrollY), Math.round(r.width), Math.round(r.height)];
    });
  }
  document.body.setAttribute("data-boxes", JSON.stringify(boxes));
});
</script>"""


def browser() -> str | None:
  """The path of the chromium binary, or None where it is not installed."""
  return shutil.which(BROWSER)


def _chromium(url: str, *args: str, width: int, height: int, scale: float = 1.0) -> subprocess.CompletedProcess:
  command = [browser() or BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--force-device-scale-factor={scale}", f"--window-size={width},{height}", "--virtual-time-budget=10000",
             *args, url]
  return subprocess.run(command, check=True, capture_output=True, text=True, timeout=180)


def screenshot(page: pathlib.Path, *, width: int = 1600, height: int = 1200, scale: float = 1.0) -> np.ndarray:
  """[height * scale, width * scale, 3] uint8: the page (an HTML file) as headless Chromium renders it in a
  window of width x height CSS pixels, each drawn as scale x scale screen pixels."""
  with tempfile.TemporaryDirectory() as tmp:
    shot = pathlib.Path(tmp) / "shot.png"
    _chromium(page.resolve().as_uri(), f"--screenshot={shot}", width=width, height=height, scale=scale)
    return np.array(PIL.Image.open(shot).convert("RGB"))


def element_boxes(page: pathlib.Path, selectors: dict[str, str], *, width: int = 1600,
                  height: int = 1200) -> dict[str, list[tuple[int, int, int, int]]]:
  """{name: [(left, top, width, height) in page pixels]} of the elements each CSS selector matches."""
  copy = page.with_name(f".{page.stem}.boxes.html")  # beside the page: its relative image links still resolve
  copy.write_text(page.read_text().replace("</body>", _BOXES_SCRIPT % json.dumps(selectors) + "</body>"))
  try:
    dom = _chromium(copy.resolve().as_uri(), "--dump-dom", width=width, height=height).stdout
  finally:
    copy.unlink()
  start = dom.index('data-boxes="') + len('data-boxes="')
  text = dom[start:dom.index('"', start)].replace("&quot;", '"')
  return {name: [tuple(box) for box in boxes] for name, boxes in json.loads(text).items()}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  output = pathlib.Path(_OUTPUT.value)
  if browser() is None:
    raise errors.UserError(f"{BROWSER} is not installed (apt-get install {BROWSER})")
  root = pathlib.Path(__file__).resolve().parents[1]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "demo"
    subprocess.run([sys.executable, "-m", "experiments.segment", "--config=configs/demo.py", f"--workdir={workdir}",
                    "--config.model.weights=random", f"--xla_cache_dir={tmp}/xla"], cwd=root, check=True)
    pixels = screenshot(workdir / "gallery.html", width=1500, height=1250, scale=0.6)  # drawn small: sharp text
  output.parent.mkdir(parents=True, exist_ok=True)
  picture = PIL.Image.fromarray(pixels).quantize(colors=256, dither=PIL.Image.Dither.NONE)  # a small file
  picture.save(output, optimize=True)
  print(f"wrote {output} ({output.stat().st_size // 1024} KB)")


if __name__ == "__main__":
  errors.run_main(main)

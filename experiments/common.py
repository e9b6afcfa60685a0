"""Helpers shared by the absl binaries."""

import importlib.util
import io
import json
import pathlib
import sys

import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from jaxseg._files import atomic_write_bytes  # noqa: F401  (re-exported: the binaries write through it)


_HELP_FLAGS = ("help", "?", "helpshort", "helpfull", "helpxml")


def run_with_help_exit_zero(run) -> None:
  """run() (e.g. errors.run_main(main)), with absl's exit status 1 after a help the user asked for made 0."""
  try:
    run()
  except SystemExit as e:
    if e.code == 1 and any(arg.lstrip("-").split("=")[0] in _HELP_FLAGS for arg in sys.argv[1:]):
      sys.exit(0)
    raise


# Programs that compile faster than this stay out of the persistent XLA cache. jax's default, 1 s, kept
# or dropped the refinement programs (0.9-1.3 s each on 2 cores) by how busy the machine was.
XLA_CACHE_MIN_COMPILE_SECS = 0.2


def use_xla_cache(directory: str, max_mb: int) -> None:
  """Persistent XLA compilation cache in directory (~ expanded), least recently used entries deleted beyond
  max_mb MB (-1: unbounded), keeping every program that took XLA_CACHE_MIN_COMPILE_SECS or more to compile."""
  import jax
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(directory).expanduser()))
  jax.config.update("jax_compilation_cache_max_size", max_mb * 2**20 if max_mb >= 0 else -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", XLA_CACHE_MIN_COMPILE_SECS)


def load_config_file(path: str | pathlib.Path):
  """Runs a configs/*.py file's get_config() and returns its ConfigDict."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_items(config: dict, prefix: str = ""):
  """Yields (dotted name, value) of every leaf field of a (nested) config dict, e.g. ('model.variant', 'x')."""
  for key, value in config.items():
    if isinstance(value, dict):
      yield from config_items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def save_npz(path: str | pathlib.Path, **arrays) -> None:
  """np.savez, written atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  atomic_write_bytes(path, buffer.getvalue())


def load_npz(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def save_json(path: str | pathlib.Path, obj) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_png(path: str | pathlib.Path, array: np.ndarray, palette: np.ndarray | None = None,
             text: dict[str, str] | None = None) -> None:
  """Writes a uint8 image ([H, W] or [H, W, 3]) as PNG atomically; with a palette [256, 3] as a palette PNG.

  text: PNG text chunks, written before the pixels (PIL's Image.info has them without decoding).
  """
  array = np.ascontiguousarray(array, np.uint8)
  if palette is None:
    image = PIL.Image.fromarray(array)
  else:
    image = PIL.Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
    image.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
  info = PIL.PngImagePlugin.PngInfo()
  for key, value in (text or {}).items():
    info.add_text(key, value)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", pnginfo=info)
  atomic_write_bytes(path, buffer.getvalue())


def read_png_indices(path: str | pathlib.Path) -> np.ndarray:
  """Reads a (palette) PNG as its indices: uint8 [H, W]."""
  with PIL.Image.open(path) as image:
    return np.array(image)

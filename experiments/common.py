"""Helpers shared by the absl binaries."""

import importlib.util
import pathlib


def load_config_file(path: str | pathlib.Path):
  """Runs a configs/*.py file's get_config() and returns its ConfigDict."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_fields(path: str | pathlib.Path) -> list[str]:
  """Dotted names of every leaf field of a config file, e.g. ['model.variant', 'seed']."""
  def walk(d, prefix):
    for key, value in d.items():
      if isinstance(value, dict):
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"
  return sorted(walk(load_config_file(path).to_dict(), ""))

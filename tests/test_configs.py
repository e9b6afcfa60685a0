"""configs/*.py against the method's dataclasses: every MethodConfig / CRFConfig field is a config field."""

import dataclasses
import importlib
import pathlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from configs import _base
from jaxseg.framework import CRFConfig
from jaxseg.framework import MethodConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
SECTIONS = {"method": MethodConfig, "crf": CRFConfig}


def _fields(cls) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(cls) if f.name != "crf"}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_sections_have_exactly_the_dataclass_fields(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  for section, cls in SECTIONS.items():
    if section not in config:  # the feature analysis stops before refinement: no crf section
      assert name.startswith("analyze") and section == "crf", (name, section)
      continue
    assert set(config[section]) == set(_fields(cls)), (name, section)
  MethodConfig.from_mappings(config.method, config.get("crf"))  # every value valid


def test_base_config_holds_the_dataclass_defaults_with_a_comment():
  config = _base.get_base_config()
  source = (ROOT / "configs" / "_base.py").read_text()
  for section, cls in SECTIONS.items():
    for name, field in _fields(cls).items():
      assert config[section][name] == field.default, (section, name)
      line = re.search(rf"^ *config\.{section}\.{name} = [^\n]*$", source, re.M)
      assert line and "#" in line.group(0), f"config.{section}.{name} has no comment giving its allowed values"


def _changed(value):
  """A different valid command-line value for a numeric field; strings keep their default."""
  if isinstance(value, bool) or isinstance(value, str):
    return value
  return value + 1 if isinstance(value, int) else value + 0.25


@pytest.mark.parametrize("name", ["voc_dinov2_vits14", "coco_dinov2_vitb14"])
def test_every_field_is_overridable_on_the_command_line(name):
  values = {(section, field): _changed(f.default) for section, cls in SECTIONS.items()
            for field, f in _fields(cls).items()}
  values["method", "sample_budget"] = 1000
  argv = (["segment", f"--config={ROOT / 'configs' / name}.py"] +
          [f"--config.{section}.{field}={value}" for (section, field), value in values.items()])
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  built = MethodConfig.from_mappings(config.method, config.crf)
  for (section, field), value in values.items():
    assert getattr(built.crf if section == "crf" else built, field) == value, (section, field)


def test_coco_labels_connected_regions_and_voc_the_whole_mask():
  coco = importlib.import_module("configs.coco_dinov2_vitb14").get_config()
  assert 0 < coco.method.min_region_fraction < 1
  coco3 = importlib.import_module("configs.coco_dinov3_vitb16").get_config()
  assert coco3.model.variant == "dinov3_vitb16" and coco3.method == coco.method and coco3.crf == coco.crf
  for name in ("voc_dinov2_vits14", "voc_dinov2_vitb14", "voc_dino_vits8", "voc_dinov3_vits16", "voc_dinov3_vitb16"):
    voc = importlib.import_module(f"configs.{name}").get_config()
    assert voc.method.min_region_area == 0 and voc.method.min_region_fraction == 0, name


@pytest.mark.parametrize("name", [n for n in CONFIGS if "dinov3" in n])
def test_dinov3_configs_run_448_pixels_on_their_variant(name):
  from jaxseg import models
  config = importlib.import_module(f"configs.{name}").get_config()
  variant = config.model.variant
  assert variant.startswith("dinov3_") and variant in name and config.image_size == 448
  assert config.image_size % models.VARIANTS[variant].patch_size == 0


def test_analysis_compares_dino_dinov2_and_dinov3_by_default():
  from configs import analyze_voc
  backbones = analyze_voc.get_config().backbones
  assert {"dinov3_vits16", "dinov3_vitb16"} <= set(backbones)
  assert {b.split("_")[0] for b in backbones} == {"dino", "dinov2", "dinov3"}

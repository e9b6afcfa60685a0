"""User errors end every binary with one `error: ...` line naming the field, file or value, and exit status 2.

Most cases stop before any ViT runs (flag parsing, validation); the expected messages are written
out here by hand from the inputs each test plants.
"""

import os
import pathlib
import subprocess
import sys

import pytest

import fixtures
from experiments import common
from experiments import validation
from experiments.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
TINY = ["--config.model.weights=random", "--config.image_size=28", "--config.batch_size=2",
        "--config.method.num_classes=2", "--config.method.num_categories=1", "--config.crf.iterations=1",
        "--config.gallery_size=1"]


def _binary(module: str, *args, env=ENV, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *(["-m", module] if module else []), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
  """The run exited 2 with exactly one `error:` line, holding every fragment, and no traceback."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, out.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


# ---- validation, in process ------------------------------------------------------------------------

def _demo(**overrides):
  return fixtures.segment_config(ROOT / "configs" / "demo.py", **overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"method.fusion": "medain"}, "config.method.fusion='medain' is not one of ('vote', 'intersection', 'mean')"),
    ({"method.fg_prior": "size"}, "config.method.fg_prior='size' is not one of ('border', 'attention')"),
    ({"model.dtype": "int8"}, "config.model.dtype='int8' is not one of"),
    ({"image_size": 450}, "config.image_size=450 is not a multiple of dinov2_vits14's patch size 14"),
    ({"image_size": 0}, "config.image_size=0 must be > 0"),
    ({"model.variant": "dinov4_vits16"}, "config.model.variant: 'dinov4_vits16' is not one of"),
    ({"batch_size": 0}, "config.batch_size=0 must be >= 1"),
    ({"crf.iterations": -1}, "config.crf.iterations=-1 must be >= 0"),
    ({"crf.bilateral_srgb": 0.0}, "config.crf.bilateral_srgb=0.0 must be > 0"),
    ({"crf.gaussian_sxy": -1.0}, "config.crf.gaussian_sxy=-1.0 must be > 0"),
    ({"method.num_classes": 300}, "config.method.num_classes=300 must be in [1, 254]"),
    ({"method.dataset_k": 1}, "config.method.dataset_k=1 must be >= 2"),
    ({"model.weights": "/no/such/weights.pth"}, "config.model.weights='/no/such/weights.pth' is neither"),
    ({"data.name": "folder:/no/such/folder"}, "config.data.name='folder:/no/such/folder': /no/such/folder is not"),
    ({"data.name": "voc"}, "config.data.name='voc' is not one of"),
    ({"distributed.num_processes": 2, "distributed.process_id": 2}, "config.distributed.process_id=2 must be <"),
])
def test_validate_names_the_field_and_value(overrides, message):
  with pytest.raises(UserError) as raised:
    validation.validate(_demo(**overrides))
  assert message in str(raised.value)


def test_validate_accepts_every_shipped_config():
  for path in sorted((ROOT / "configs").glob("[a-z]*.py")):
    validation.validate(common.load_config_file(path))


def test_validate_analysis_config_names_backbone_blocks_and_features():
  config = fixtures.segment_config(ROOT / "configs" / "analyze_voc.py", blocks=(-1, 12))
  with pytest.raises(UserError, match=r"config.blocks \[12\] out of range for dino_vits8 \(depth 12"):
    validation.validate(config)
  config = fixtures.segment_config(ROOT / "configs" / "analyze_voc.py", features=("k", "keys"))
  with pytest.raises(UserError, match="config.features=.*'keys'"):
    validation.validate(config)
  backbones = ("dino_vits8", "dinov2_vits14")
  config = fixtures.segment_config(ROOT / "configs" / "analyze_voc.py", backbones=backbones, image_size=64)
  with pytest.raises(UserError, match="config.image_size=64 is not a multiple of dinov2_vits14's patch size 14"):
    validation.validate(config)
  validation.validate(fixtures.segment_config(ROOT / "configs" / "analyze_voc.py", backbones=backbones,
                                              image_size=112))  # lcm(8, 14) * 2


def test_validate_rejects_unknown_field_and_workdir_that_is_a_file(tmp_path):
  config = _demo()
  config.method.fusoin = "mean"
  with pytest.raises(UserError, match=r"config\.method\.fusoin"):
    validation.validate(config)
  file = tmp_path / "a_file"
  file.write_text("x")
  with pytest.raises(UserError, match="is a file"):
    validation.validate(_demo(), file)
  validation.validate(_demo(), tmp_path / "new" / "workdir")
  assert (tmp_path / "new" / "workdir").is_dir()


# ---- the binaries --------------------------------------------------------------------------------------

def test_config_typo_names_the_field_and_its_neighbour(tmp_path):
  for config in ([], ["--config=configs/demo.py"]):  # overrides applied at import, and at flag parsing
    out = _binary("experiments.segment", f"--workdir={tmp_path}", *config, "--config.method.fusoin=mean")
    line = _assert_one_line_error(out, "config.method.fusoin", "config.method.fusion")
    assert "\\n" not in line and "\\'" not in line, line


def test_bad_values_and_files_on_the_command_line(tmp_path):
  out = _binary("experiments.segment", f"--workdir={tmp_path}", "--config.batch_size=abc")
  _assert_one_line_error(out, "--config.batch_size=abc")
  out = _binary("experiments.segment", f"--workdir={tmp_path}", "--config=configs/no_such_config.py")
  _assert_one_line_error(out, "configs/no_such_config.py")
  out = _binary("experiments.segment", f"--workdir={tmp_path}", "--config.method.fusion=medain")
  _assert_one_line_error(out, "config.method.fusion='medain'")
  assert not (tmp_path / "features").exists()  # refused before any work
  out = _binary("experiments.segment", f"--workdir={tmp_path / 'w'}", "--config.image_size=450",
                "--config.model.weights=hf", env=dict(ENV, JAXSEG_CACHE=str(tmp_path / "cache")))
  _assert_one_line_error(out, "config.image_size=450", "14")
  assert not (tmp_path / "cache").exists()  # validated before any download
  file = tmp_path / "file"
  file.write_text("")
  _assert_one_line_error(_binary("experiments.segment", f"--workdir={file}"), str(file), "is a file")


def test_debug_verbosity_shows_the_traceback(tmp_path):
  out = _binary("experiments.segment", f"--workdir={tmp_path}", "--config.method.fusion=medain", "--verbosity=1")
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert out.stderr.rstrip().splitlines()[-1].startswith("error: config.method.fusion='medain'")


def test_bad_data_dir_names_it(tmp_path):
  manual = tmp_path / "empty_manual"
  manual.mkdir()
  out = _binary("experiments.segment", f"--workdir={tmp_path / 'w'}", "--config=configs/voc_dinov2_vits14.py",
                f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.data.manual_dir={manual}", *TINY)
  _assert_one_line_error(out, str(manual))


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"], ids=["empty", "truncated"])
def test_bad_weights_file_names_it(tmp_path, content):
  weights = tmp_path / "weights.safetensors"
  weights.write_bytes(content)
  out = _binary("experiments.convert_weights", f"--input={weights}", "--variant=dinov2_vits14",
                f"--output={tmp_path / 'out.safetensors'}")
  _assert_one_line_error(out, str(weights))
  folder = fixtures.make_photo_folder(tmp_path / "photos", {"a": (28, 28), "b": (30, 26)})
  out = _binary("experiments.segment", f"--workdir={tmp_path / 'w'}", f"--config.data.name=folder:{folder}",
                *TINY, f"--config.model.weights={weights}")
  _assert_one_line_error(out, str(weights))


def test_convert_weights_missing_input(tmp_path):
  out = _binary("experiments.convert_weights", f"--input={tmp_path / 'nope.pth'}", "--variant=dinov2_vits14",
                f"--output={tmp_path / 'out.safetensors'}")
  _assert_one_line_error(out, str(tmp_path / "nope.pth"), "no such file")


def test_benchmark_without_its_reference_names_the_extra():
  # scikit-learn made unimportable (None in sys.modules), then the benchmark binary run as __main__.
  script = ("import runpy, sys; sys.modules['sklearn'] = None; sys.argv = ['benchmark', '--only=kmeans']; "
            "runpy.run_module('experiments.benchmark', run_name='__main__')")
  out = _binary("", "-c", script)
  _assert_one_line_error(out, "scikit-learn", "pip install -e '.[test]'")


def test_analyze_features_validates_before_work(tmp_path):
  out = _binary("experiments.analyze_features", f"--workdir={tmp_path}", "--config.image_size=30",
                "--config.model.weights=random")
  _assert_one_line_error(out, "config.image_size=30", "patch size")
  assert not any(tmp_path.iterdir())

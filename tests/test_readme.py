"""The README stays true: every fenced code block of README.md runs, or at least parses, as written.

- ```python blocks run in a subprocess (cwd = repo root, JAX on CPU) with the weights "hf" / "meta"
  replaced by "random" and the ViT input sizes 224, 448, 518 by 112 (the only edits).
- ```bash blocks are split into commands (backslash continuations joined, `&&` split). The install
  steps (`python3 -m venv`, `. .venv/bin/activate`, `pip install`) and `python -m pytest` are what CI
  runs and are skipped. `python -m experiments.segment --config=configs/demo.py` needs no network with
  random weights, so it runs, in a temporary HOME and workdir, with a 56-pixel input and
  crf.iterations=0 (compiling the CRF's bucket programs would double the time; test_crf,
  test_refine and test_segment cover it), and must write metrics.json.
  Every other `python -m experiments.<binary>` needs data or weights that are not here, so it is
  checked as an absl invocation: (1) the command with --helpfull appended exits as absl's help does
  (status 1, see HELP_EXIT; segment's help exits 0) and prints neither a traceback nor an `error:` line; (2) every argument
  is a flag the binary defines (absl reports unknown flags only after the last argument, which
  --helpfull never reaches, so a misspelt --worrkdir would pass (1) alone; a misspelt config field
  fails (1)). A block of lines that are only flags (`--config.distributed...`) is appended to the
  demo command and checked the same way, its placeholder values N and I read as 2 and 0.
- Any other block (another language, or untagged) fails: tag it.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# absl's --helpfull prints the help and calls sys.exit(1) (absl/app.py, HelpfullFlag.parse); segment makes it 0
# (experiments/common.py, run_with_help_exit_zero).
HELP_EXIT = {"experiments.segment": 0}
SKIPPED = ("python3 -m venv", ". .venv/bin/activate", "source .venv/bin/activate", "pip install",
           "python -m pytest")
DEMO = "python -m experiments.segment --config=configs/demo.py"
DEMO_SMALL = ["--config.model.weights=random", "--config.image_size=56", "--config.batch_size=3",
              "--config.crf.iterations=0", "--config.gallery_size=2"]
# The README's placeholder values (--config.distributed.num_processes=N ... process_id=I) and examples.
PLACEHOLDERS = {"N": "2", "I": "0"}
BINARY = re.compile(r"python -m (experiments\.\w+)\b")

# Runs the binary as `python -m` does with --helpfull appended, then parses its flags strictly.
_ABSL_CHECK = r"""
import contextlib, io, runpy, sys
from absl import flags
binary, args = sys.argv[1], sys.argv[2:]
help_text = io.StringIO()
sys.argv = [binary, *args, "--helpfull"]
with contextlib.redirect_stdout(help_text), contextlib.redirect_stderr(help_text):
  try:
    runpy.run_module(binary, run_name="__main__", alter_sys=True)
    status = 0
  except SystemExit as e:
    status = e.code
print(help_text.getvalue())
print(f"HELP_EXIT={status}")
# absl parsed every flag before --helpfull (config overrides included) but reports unknown ones only
# after the last argument, which help never reaches: look them up among the flags now defined.
known = set(flags.FLAGS)
for arg in args:
  name = arg[2:].partition("=")[0] if arg.startswith("--") else None
  if name is None or (name not in known and not (name.startswith("no") and name[2:] in known)):
    print(f"STRICT_PARSE_ERROR=unknown flag or argument {arg!r}")
"""


def code_blocks(text: str) -> list[tuple[int, str, str]]:
  """(line number, language, body) of every fenced block."""
  return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
          for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, re.S | re.M)]


def bash_commands(body: str) -> list[str]:
  """Commands of a bash block: continuations joined, `&&` split, a flags-only block appended to DEMO."""
  lines = [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]
  if lines and all(line.startswith("--") for line in lines):
    return [f"{DEMO} {line}" for line in lines]
  return [command.strip() for line in lines for command in line.split("&&")]


def _env(home: pathlib.Path) -> dict[str, str]:
  # A temporary HOME keeps the demo's data, weights and compile caches out of the user's.
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT),
              HOME=str(home), JAXSEG_CACHE=str(home / "jaxseg"))


def run_python_block(body: str, home: pathlib.Path) -> subprocess.CompletedProcess:
  code = re.sub(r"""(["'])(hf|meta)\1""", '"random"', body)
  code = re.sub(r"\b(224|448|518)\b", "112", code)
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(home), capture_output=True,
                        text=True, timeout=900)


def run_demo(command: str, tmp_path: pathlib.Path) -> None:
  args = [a for a in shlex.split(command)[3:] if not a.startswith("--workdir")]
  workdir = tmp_path / "workdir"
  out = subprocess.run([sys.executable, "-m", "experiments.segment", *args, f"--workdir={workdir}",
                        *DEMO_SMALL], cwd=ROOT, env=_env(tmp_path / "home"), capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, f"{command}\n{out.stderr[-4000:]}"
  assert (workdir / "metrics.json").is_file(), f"{command}: no metrics.json in {sorted(workdir.iterdir())}"


def check_absl_invocation(command: str, tmp_path: pathlib.Path) -> None:
  binary = BINARY.match(command).group(1)
  args = [re.sub(r"=([A-Z])$", lambda m: "=" + PLACEHOLDERS.get(m.group(1), m.group(1)), a)
          for a in shlex.split(command)[3:]]
  out = subprocess.run([sys.executable, "-c", _ABSL_CHECK, binary, *args], cwd=ROOT,
                       env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
  text = out.stdout + out.stderr
  assert out.returncode == 0 and "Traceback" not in text, f"{command}\n{text[-4000:]}"
  assert f"HELP_EXIT={HELP_EXIT.get(binary, 1)}\n" in out.stdout, f"{command} --helpfull did not exit as absl's help:\n{text[-3000:]}"
  errors = [line for line in text.splitlines() if re.match(r"\s*(error|fatal)\b", line, re.I)]
  assert not errors, f"{command} --helpfull printed {errors}"
  assert "--workdir" in text or "--input" in text or "--only" in text, f"{command}: no help printed\n{text[-2000:]}"
  assert "STRICT_PARSE_ERROR" not in text, f"{command}: {text[text.index('STRICT_PARSE_ERROR'):][:500]}"


BLOCKS = code_blocks(README.read_text())


def test_readme_has_blocks():
  assert any(lang == "python" for _, lang, _ in BLOCKS) and any(lang == "bash" for _, lang, _ in BLOCKS)


def test_every_block_is_tagged():
  untagged = [f"line {line}: ```{lang}" for line, lang, _ in BLOCKS if lang not in ("python", "bash")]
  assert not untagged, (f"README.md {untagged}: a block untagged or in another language: tag it ```python or "
                        "```bash so that tests/test_readme.py runs it, or make it prose")


def test_readme_offers_the_offline_demo():
  """The quick start's offline smoke run is one of the commands test_bash_command runs."""
  commands = [command for _, lang, body in BLOCKS if lang == "bash" for command in bash_commands(body)]
  assert any(c.startswith(DEMO) and "--config.model.weights=random" in c for c in commands), commands


@pytest.mark.slow
@pytest.mark.parametrize("line, body", [(line, body) for line, lang, body in BLOCKS if lang == "python"])
def test_python_block_runs(line, body, tmp_path):
  out = run_python_block(body, tmp_path)
  assert out.returncode == 0, f"README.md line {line}:\n{out.stderr[-4000:]}"


def _bash_cases():
  for line, lang, body in BLOCKS:
    for command in bash_commands(body) if lang == "bash" else []:
      if not command.startswith(SKIPPED):
        slow = command.startswith(DEMO) and "--config.distributed" not in command
        yield pytest.param(line, command, marks=[pytest.mark.slow] if slow else [], id=f"L{line}-{command[:60]}")


@pytest.mark.parametrize("line, command", list(_bash_cases()))
def test_bash_command(line, command, tmp_path):
  assert BINARY.match(command), (f"README.md line {line}: {command!r} is neither an install step nor "
                                 "`python -m experiments.<binary>`: teach tests/test_readme.py how to check it")
  if command.startswith(DEMO) and "--config.distributed" not in command:
    run_demo(command, tmp_path)
  else:
    check_absl_invocation(command, tmp_path)

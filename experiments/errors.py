"""User errors end a binary with one line, `error: <message>`, and exit code 2; bugs keep their traceback.

    if __name__ == "__main__":
      errors.run_main(main)          # instead of app.run(main)

A user error is:
  - UserError, raised by the runners (validation, a busy workdir, an empty split);
  - models.WeightsUnavailableError (offline, failed download: names the URL and the path);
  - a ValueError or OSError raised from the modules that read the user's files (USER_INPUT_MODULES:
    jaxseg.data and the checkpoint readers of jaxseg.models), e.g. a truncated .safetensors or a bad
    archive; those modules name the file in their messages;
  - a bad command line: a config typo, a value of the wrong type, a missing --workdir, stray arguments.
Anything else is a bug and ends with its traceback, as before. --verbosity=1 (or -v 1) prints the
traceback of a user error too, before its line.

SIGTERM and SIGINT (Ctrl-C) end a binary with one line, `stopped by SIGTERM: ...`, and exit code 143 or 130
(128 + the signal): the signal is raised as an exception in the main thread, so context managers (the
workdir lock) release on the way out and no half-written file is left.
"""

import difflib
import logging
import re
import signal
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags

from jaxseg import models


class _NoTpuProbeLine(logging.Filter):
  """Drops jax's "Unable to initialize backend 'tpu'" line, which every run on a machine without TPUs printed."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


# jax probes for libtpu.so whatever the machine; on a TPU host the backend starts and this line never comes.
logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuProbeLine())


# The modules that read files the user hands in: their ValueError / OSError is about that file, not a bug.
USER_INPUT_MODULES = ("jaxseg.data", "jaxseg.models.checkpoint", "jaxseg.models.pretrained", "jaxseg.models.convert")
EXIT_CODE = 2


class UserError(Exception):
  """A user mistake (config, data, weights file, busy workdir); its message is the one line shown.

  exit_code: the process's exit status (2; a process ending because another failed reuses that one's).
  """
  exit_code = EXIT_CODE


class UserValueError(UserError, ValueError):
  """A UserError that is also a ValueError, for runners that research code calls and catches ValueError from."""


class Stopped(BaseException):
  """A SIGTERM or SIGINT received by a binary (a BaseException: no `except Exception` swallows it)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.exit_code = 128 + signum


def _stop(signum, frame):  # noqa: ARG001 - the signal module's handler signature
  raise Stopped(signum)


def one_line(text: str) -> str:
  """text with its line breaks and runs of blanks collapsed: error messages are one line."""
  return re.sub(r"\s*\n\s*", "; ", str(text).strip()).replace("\t", " ")


def _innermost_jaxseg_module(error: BaseException) -> str | None:
  """Name of the innermost jaxseg module in the traceback: the code that raised or called the raiser."""
  module = None
  tb = error.__traceback__
  while tb is not None:
    name = tb.tb_frame.f_globals.get("__name__", "")
    if name == "jaxseg" or name.startswith("jaxseg."):
      module = name
    tb = tb.tb_next
  return module


def user_message(error: BaseException) -> str | None:
  """The one-line message of a user error (see the module docstring); None for a bug."""
  if isinstance(error, (UserError, models.WeightsUnavailableError, app.UsageError)):
    return one_line(error)
  if isinstance(error, (ValueError, OSError)):
    module = _innermost_jaxseg_module(error)
    if module and any(module == m or module.startswith(m + ".") for m in USER_INPUT_MODULES):
      return one_line(error)
  return None


def exit_code(error: BaseException) -> int:
  return getattr(error, "exit_code", EXIT_CODE)


def _debug() -> bool:
  """--verbosity >= 1 (absl's -v) was asked for: show tracebacks of user errors too."""
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbosity >= 1
  for i, arg in enumerate(sys.argv):  # before flag parsing: read the command line itself
    value = arg.split("=", 1)[1] if "=" in arg else (sys.argv[i + 1] if i + 1 < len(sys.argv) else "")
    if arg.split("=", 1)[0] in ("--verbosity", "-v") and value.lstrip("-").isdigit():
      return int(value) >= 1
  return False


def fail(message: str, code: int = EXIT_CODE, error: BaseException | None = None):
  """Prints `error: message` (after the traceback of error with --verbosity=1) and exits with code."""
  if error is not None and _debug():
    traceback.print_exception(error)
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


_config_default = None  # the --config default given to define_config_file


def _config_message(error: BaseException) -> str:
  """One line for a config file or a --config.FIELD override that failed to load, naming the field."""
  given = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")]
  path = (given[-1] if given else _config_default or "").split(":", 1)[0]
  try:
    from experiments.common import load_config_file  # noqa: PLC0415 - common imports this module's users
    config = load_config_file(path)
  except FileNotFoundError:
    return f"--config={path}: no such file"
  except Exception:  # noqa: BLE001 - the file itself is broken: report the original error
    return f"--config={path}: {one_line(error)}"
  for arg in sys.argv:
    match = re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    node, prefix = config, "config"
    for key in match.group(1).split("."):
      if not hasattr(node, "keys"):
        return f"--config.{match.group(1)}: {prefix} is a {type(node).__name__}, not a group of fields"
      if key not in node.keys():
        near = difflib.get_close_matches(key, list(node.keys()), n=1)
        hint = f"did you mean {prefix}.{near[0]}?" if near else f"its fields are {sorted(node.keys())}"
        return f"--config.{match.group(1)}: {prefix} has no field {key!r}; {hint}"
      node, prefix = node[key], f"{prefix}.{key}"
  message = error.args[0] if isinstance(error, (KeyError, AttributeError)) and error.args else error
  return one_line(message)


_CONFIG_ERRORS = (KeyError, AttributeError, TypeError, ValueError, OSError)


def define_config_file(default: str, help_string: str):
  """config_flags.DEFINE_config_file("config", lock_config=True); a bad override ends in one `error:` line.

  ml_collections applies the --config.FIELD overrides while defining the flag when --config itself
  is not on the command line, i.e. at import, where an unknown field would print a traceback.
  """
  global _config_default
  _config_default = default
  try:
    return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)
  except _CONFIG_ERRORS as e:
    fail(_config_message(e), error=e)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override ending in one `error:` line."""
  try:
    args = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS["config"].value.keys()  # noqa: B018 - a config file that failed to load raises here
    return args
  except flags.Error as e:
    fail(str(e), error=e)  # absl's messages name the flag and the value
  except _CONFIG_ERRORS as e:  # raised by ml_collections loading the file or applying --config overrides
    fail(_config_message(e), error=e)


def run_main(main) -> None:
  """app.run(main), with every user error (module docstring) ending in one line and exit code 2."""

  def handled(argv):
    for signum in (signal.SIGTERM, signal.SIGINT):
      signal.signal(signum, _stop)
    try:
      return main(argv)
    except Stopped as e:
      print(f"stopped by {e}: the workdir is released; the same command resumes where this run stopped",
            file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - bugs are re-raised below, with their traceback
      message = user_message(e)
      if message is None:
        raise
      fail(message, exit_code(e), error=e)

  app.run(handled, flags_parser=_parse_flags)

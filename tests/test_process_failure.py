"""A failure in one of 2 jax.distributed processes (localhost) ends both, non-zero, within a bound.

Process 1 raises inside distributed.guard() while process 0 waits at a barrier (as the runner's
passes do): without the published failure, process 0 would wait there forever. A process killed
outright publishes nothing: the runtime's heartbeat (distributed.HEARTBEAT_SECONDS) ends the other.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
BOUND_S = 60  # both processes must have exited by then (each takes ~3 s to start)

_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import ml_collections
    from experiments import distributed, errors
    process_id, port, failure = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    def main(argv):
      distributed.initialize(ml_collections.ConfigDict(
          dict(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)))
      with distributed.guard():
        distributed.barrier("started")
        if process_id == 1:
          time.sleep(1)
          if failure == "user":
            raise errors.UserError("planted user error in process 1")
          if failure == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
          raise ZeroDivisionError("planted bug in process 1")
        distributed.barrier("never reached by process 1")
        print("process 0 passed the barrier", flush=True)

    errors.run_main(main)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_pair(tmp_path: pathlib.Path, failure: str) -> tuple[list[int], list[str]]:
  """Starts processes 0 and 1 of _SCRIPT; returns their exit codes and outputs (killed past BOUND_S)."""
  port = _free_port()
  logs = [tmp_path / f"{i}.log" for i in range(2)]
  start = time.time()
  processes = []
  for i in range(2):
    with open(logs[i], "wb") as log:
      processes.append(subprocess.Popen([sys.executable, "-c", _SCRIPT, str(i), str(port), failure], cwd=ROOT,
                                        env=ENV, stdout=log, stderr=subprocess.STDOUT))
  try:
    for process in processes:
      process.wait(timeout=max(BOUND_S - (time.time() - start), 0.1))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return [p.returncode for p in processes], [log.read_text() for log in logs]


@pytest.mark.parametrize("failure, code, message", [("user", 2, "planted user error in process 1"),
                                                    ("bug", 1, "planted bug in process 1")])
def test_failure_in_one_process_ends_both(tmp_path, failure, code, message):
  codes, texts = _run_pair(tmp_path, failure)
  assert codes == [code, code], texts
  assert "passed the barrier" not in texts[0]
  assert f"error: process 1 failed: {'ZeroDivisionError: ' if failure == 'bug' else ''}{message}" in texts[0], texts[0]
  assert message in texts[1]
  if failure == "user":
    assert "Traceback" not in texts[0] + texts[1]
  else:  # a bug keeps its traceback where it happened
    assert "Traceback" in texts[1] and "Traceback" not in texts[0]


@pytest.mark.slow
def test_killed_process_ends_the_other_by_heartbeat(tmp_path):
  codes, texts = _run_pair(tmp_path, "kill")
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, texts
  assert "passed the barrier" not in texts[0]

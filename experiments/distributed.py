"""Several processes (hosts) in one run: JAX's distributed runtime, configured from config.distributed.

    distributed.initialize(config.distributed)   # first, before any JAX computation
    with distributed.guard():                     # around the whole run
      index, count = distributed.process()
      distributed.barrier("features done")        # every process waits here for the others

Failure: an exception in one process makes every process stop within seconds. guard() publishes
the failing process's one-line error in the coordination service's key-value store; barrier()
waits in short slices and raises ProcessFailed (with that line and exit code) as soon as one is
published, and a run that ends while another process failed fails at guard()'s closing barrier. A
process that dies without raising (SIGKILL, out of memory), or a peer blocked inside a collective
computation, is caught by the runtime's heartbeat: it terminates every process after
HEARTBEAT_SECONDS without news of one of them.
"""

import contextlib
import itertools
import json
import os

import jax
import ml_collections
from absl import logging
from jax._src import distributed as jax_distributed

from experiments import errors

HEARTBEAT_SECONDS = 20  # a silent process is declared dead after this (JAX's default: 100)
SHUTDOWN_SECONDS = 60  # the shutdown barrier at exit waits this long for the other processes
_POLL_MS = 200  # barriers look for a published failure this often
_ERROR_KEY = "jaxseg/error"
_barriers = itertools.count()  # every process passes the same barriers in the same order


class ProcessFailed(errors.UserError):
  """Another process of the run failed; the message is its error line, exit_code its exit status."""

# Set by launchers that start one task per host; JAX's cluster detection reads the rest from them.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_detected() -> bool:
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return any(int(os.environ.get(name, "1") or "1") > 1 for name in _CLUSTER_SIZE_VARIABLES)


def initialize(settings: ml_collections.ConfigDict) -> None:
  """Calls jax.distributed.initialize when the run spans several processes; else does nothing.

  Several processes means: settings.coordinator_address is set or
  settings.num_processes > 1, or the environment names a coordinator
  (JAX_COORDINATOR_ADDRESS) or a multi-task Slurm / Open MPI job. Fields left
  empty ("", 0, -1) are read by JAX from that environment.

  Args:
    settings: config.distributed with coordinator_address (str, "host:port" of process 0),
      num_processes (int, 0 = from the environment), process_id (int, -1 = from the environment).
  """
  configured = bool(settings.coordinator_address) or settings.num_processes > 1
  if not (configured or _cluster_detected()):
    return
  jax.distributed.initialize(coordinator_address=settings.coordinator_address or None,
                             num_processes=settings.num_processes or None,
                             process_id=settings.process_id if settings.process_id >= 0 else None,
                             heartbeat_timeout_seconds=HEARTBEAT_SECONDS,
                             shutdown_timeout_seconds=SHUTDOWN_SECONDS)
  logging.info("process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def process() -> tuple[int, int]:
  """(index of this process, number of processes)."""
  return jax.process_index(), jax.process_count()


def main_first(name: str, compute):
  """compute() on process 0, then, after a barrier, on the others.

  For work whose first call writes to shared storage and whose later calls read it
  (preparing a dataset, downloading weights, fitting a level): process 0 does it once.
  """
  if jax.process_index() == 0:
    result = compute()
  barrier(name)
  if jax.process_index() != 0:
    result = compute()
  return result


def _client():
  return jax_distributed.global_state.client


def _raise_if_failed(client, wait_ms: int) -> None:
  """Raises ProcessFailed if a process published its error, waiting for one up to wait_ms."""
  try:
    published = client.blocking_key_value_get(_ERROR_KEY, wait_ms)
  except Exception as e:  # noqa: BLE001 - jaxlib raises one runtime error type for every status
    if "DEADLINE_EXCEEDED" in str(e):
      return
    raise ProcessFailed("lost the coordination service: process 0 has stopped "
                        f"({errors.one_line(e)[:200]})") from e
  failure = json.loads(published)
  error = ProcessFailed(f"process {failure['process']} failed: {failure['message']}")
  error.exit_code = failure["code"]
  raise error


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier of this name (no-op with one process).

  Raises:
    ProcessFailed: another process failed (its error was published by guard()) meanwhile.
  """
  if jax.process_count() == 1:
    return
  client = _client()
  key = f"jaxseg/barrier/{next(_barriers):06d}/"
  client.key_value_set(f"{key}{jax.process_index()}", name)
  while True:
    arrived = dict(client.key_value_dir_get(key))
    if len(arrived) == jax.process_count():
      break
    _raise_if_failed(client, _POLL_MS)
  if set(arrived.values()) != {name}:
    raise RuntimeError(f"processes passed different barriers at once: {sorted(set(arrived.values()))}")


def _publish(error: BaseException) -> None:
  """Puts this process's error line where the others' barriers look; the first failure wins."""
  message = errors.user_message(error)
  code = errors.exit_code(error) if message is not None else 1
  if message is None:
    message = f"{type(error).__name__}: {errors.one_line(error)}"
  failure = {"process": jax.process_index(), "code": code, "message": message}
  try:
    _client().key_value_set(_ERROR_KEY, json.dumps(failure))
  except Exception:  # noqa: BLE001 - another process published first, or the service is gone
    logging.warning("could not publish the failure to the other processes", exc_info=True)


@contextlib.contextmanager
def guard():
  """Context for the whole run: a failure in any process ends every process with a non-zero status.

  On an exception here, publishes its one-line message for the other processes' barriers and re-raises;
  on success, waits at a last barrier so that a process which failed after the previous barrier fails
  the others too. With one process it does nothing.
  """
  if jax.process_count() == 1:
    yield
    return
  try:
    yield
  except ProcessFailed:
    raise  # another process's failure, already published
  except BaseException as e:
    _publish(e)
    raise
  barrier("end of run")

"""Several processes (hosts) in one run: JAX's distributed runtime, configured from config.distributed.

    distributed.initialize(config.distributed)   # first, before any JAX computation
    index, count = distributed.process()
    distributed.barrier("features done")          # every process waits here for the others
"""

import os

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

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
                             process_id=settings.process_id if settings.process_id >= 0 else None)
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


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier of this name (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

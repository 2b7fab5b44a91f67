"""Multi-host start-up: one ``initialize`` for explicit arguments, env vars, SLURM and TPU pods.

Call it once per process before anything touches devices. Resolution order:

1. explicit arguments;
2. ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or the
   torchrun-style ``MASTER_ADDR`` + ``MASTER_PORT`` / ``WORLD_SIZE`` / ``RANK``;
3. JAX's cluster auto-detection (SLURM, Cloud TPU pods, Open MPI, Kubernetes).

With none of these (a laptop, one GPU box) it does nothing: a single process is already set.
On CPU, collectives across processes use gloo.

``share`` is how the processes of a job take one decision together (which checkpoint to
restore, whether the work dir's lock was taken): each says what it saw, every one reads all.
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

SHARE_BYTES = 1024
"""The most of a process's text ``share`` carries (longer texts are cut)."""


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name):
            try:
                return int(os.environ[name])
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={os.environ[name]!r} is not an int"
                ) from None
    return None


def _env_coordinator() -> str | None:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return os.environ["JAX_COORDINATOR_ADDRESS"]
    if os.environ.get("MASTER_ADDR"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '12355')}"
    return None


def _cluster_detected() -> bool:
    """True inside a multi-process SLURM job or a multi-host Cloud TPU slice."""
    slurm_tasks = _env_int("SLURM_NTASKS")
    return bool(
        (slurm_tasks and slurm_tasks > 1 and os.environ.get("SLURM_JOB_ID"))
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
        or os.environ.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1")
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> bool:
    """Join the multi-process job if there is one; returns True when distributed is on.

    Raises ValueError when only some of coordinator / process count / process id are given,
    naming what is missing.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or _env_coordinator()
    num_processes = (
        num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES", "WORLD_SIZE")
    )
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID", "RANK")
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"multi-host set-up is incomplete: missing {', '.join(missing)} (pass them to "
                "initialize() or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        if num_processes == 1:
            return False
    elif not _cluster_detected():
        return False
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, local_device_ids=local_device_ids
    )
    return True


def share(text: str) -> list[str]:
    """Every process's ``text`` (at most ``SHARE_BYTES`` of it), in process order, on every
    process; ``[text]`` in a single process. Every process must call it at the same point: it
    is a barrier."""
    if jax.process_count() == 1:
        return [text]
    data = np.frombuffer(text.encode()[:SHARE_BYTES].ljust(SHARE_BYTES, b"\0"), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(data))
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]

"""initialize(): single process needs nothing; a half-given multi-host set-up is an error."""

import pytest

from jaxstack.distributed import initialize

CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "MASTER_ADDR",
    "WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
    "OMPI_COMM_WORLD_SIZE",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_is_a_no_op(clean_env):
    assert initialize() is False
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("RANK", "0")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    assert initialize() is False


def test_incomplete_setup_names_what_is_missing(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        initialize()
    with pytest.raises(ValueError, match="missing process_id"):
        initialize(num_processes=4)


def test_bad_env_value(clean_env):
    clean_env.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an int"):
        initialize()

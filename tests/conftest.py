"""Test setup: 8 fake CPU devices and quick compiles, set before jax is imported anywhere, and
one persistent compilation cache for the whole run."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tiny test programs spend most of their time in XLA's compiler, not running: LLVM's
# optimisation passes are skipped (a quarter less suite time; what runs is unchanged).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The same tiny programs compile in many tests, on both xdist workers and in the processes
# tests start (CLI runs, multi-process jobs, notebooks): one cache, made by the controller
# before the workers start (they inherit its environment) and removed when the run ends.
# A cache hit skips only XLA's compile; every test still traces and runs its program.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxstack-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def run_checked_script():
    """Run a test program (a path) in a fresh Python on ``devices`` fake CPU devices and
    assert it printed ``checked``: for interpreters that can hang (a timeout bounds them) or
    need a device count other than the suite's."""

    def run(script: Path, devices: int, timeout: float) -> None:
        flags = f"--xla_force_host_platform_device_count={devices}"
        env = dict(
            os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags + " --xla_backend_optimization_level=0"
        )
        done = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-3000:]

    return run

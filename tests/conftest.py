"""Test setup: 8 fake CPU devices and quick compiles, set before jax is imported anywhere, and
one persistent compilation cache for the whole run."""

import os
import shutil
import tempfile

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

"""What every benchmark shares: XLA set-up for CPU runs, the machine and versions, and the
result files that ``docs/benchmarks.md`` is made from.

A benchmark builds a JSON-ready ``report`` and calls ``write_result(name, report, versions)``,
which wraps it in a record (benchmark name, command line, UTC date, machine, versions, git
state of the measured code), writes ``benchmarks/results/<name>-<YYYY-MM-DD>-<id>.json`` and
returns the path; ``<id>`` is the first hex digits of the record's SHA-256, so two runs never
share a file name and a file name pins its content. ``benchmarks/report.py`` turns those
files into the tables of ``docs/benchmarks.md``.

Nothing here imports jax at module level: ``configure_cpu_xla`` must run before jax starts
its backend, and ``report.py`` reads results without jax.
"""

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
"""Where recorded runs live (one JSON file per run); the docs tables are made from them."""
SMOKE_RESULTS_DIR = Path(tempfile.gettempdir()) / "jaxstack-bench-results"
"""Where smoke runs (``--quick``) record unless told otherwise: out of the repository."""
LEARNING_RATE = 3e-4
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
"""The update of every training benchmark, in every framework: global-norm clipping at
``GRAD_CLIP``, then AdamW with ``BETAS``, no weight decay, at a constant ``LEARNING_RATE``."""
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


# ------------------------------------------------------------------------------ XLA set-up
def with_device_count(flags: str, count: int | None) -> str:
    """``flags`` (an ``XLA_FLAGS`` string) with any fake CPU device count removed, then set to
    ``count`` when given (``None``: one CPU device owning every core)."""
    flags = " ".join(_DEVICE_COUNT_FLAG.sub("", flags).split())
    if count is None:
        return flags
    return f"{flags} --xla_force_host_platform_device_count={count}".strip()


def configure_cpu_xla(extra_flags: str = "", device_count: int | None = None) -> str:
    """Make this process a CPU benchmark before jax starts its backend; returns ``XLA_FLAGS``.

    Sets ``JAX_PLATFORMS=cpu`` (even where a GPU exists), replaces the fake device count by
    ``device_count`` (see ``with_device_count``) and appends ``extra_flags``. XLA reads the
    flags once, when its CPU backend starts, so run each benchmark as its own process.
    """
    flags = with_device_count(os.environ.get("XLA_FLAGS", ""), device_count)
    os.environ["XLA_FLAGS"] = " ".join([*flags.split(), *extra_flags.split()])
    os.environ["JAX_PLATFORMS"] = "cpu"
    return os.environ["XLA_FLAGS"]


def start_mesh_devices(count: int) -> None:
    """Start jax with ``count`` devices for a mesh benchmark: ``count`` fake CPU devices
    unless ``JAX_PLATFORMS`` names an accelerator; exits naming the count otherwise."""
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":  # before jax starts its backend
        configure_cpu_xla(device_count=count)
    import jax

    if jax.device_count() != count:
        raise SystemExit(f"the meshes need {count} devices, found {jax.device_count()}")


# ------------------------------------------------------------------------- shared set-up
def jaxstack_train_config(work_dir: str, batch_size: int, num_steps: int) -> Any:
    """The ``jaxstack.TrainConfig`` of a training benchmark: the shared update (constant
    rate, ``BETAS``, clipping at ``GRAD_CLIP``), no checkpoint before the end, no progress
    bar."""
    from jaxstack import TrainConfig

    return TrainConfig(
        work_dir=work_dir,
        batch_size=batch_size,
        num_steps=num_steps,
        learning_rate=LEARNING_RATE,
        schedule="constant",
        b1=BETAS[0],
        b2=BETAS[1],
        grad_clip=GRAD_CLIP,
        save_every=10**9,
        progress_bar=False,
    )


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (which must wait for its result),
    after one untimed call that compiles and warms caches."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------------- machine
def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The matrix-relevant ISA extensions this CPU reports (AVX-512, bf16, AMX, VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1]
    except (OSError, StopIteration):
        return []
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx2", "fma")
    return [flag for flag in wanted if flag in flags.split()]


def _memory_gib() -> float | None:
    """Total RAM in GiB (``/proc/meminfo``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None
    return round(kib / 2**20, 1)


def _load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


START_LOAD = _load_average()
"""The load average when the benchmark process started, before any of its own work: whether
the machine was quiet, which the load when the record is written (after the benchmark's own
processes ran) cannot tell."""


def machine() -> dict[str, Any]:
    """The host a result was measured on: CPU model and ISA flags, usable cores, RAM, OS and
    the load averages when the benchmark started and when the record is written (other
    processes share the machine)."""
    return {
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "usable_cores": usable_cpus(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "load_average_at_start_1_5_15": START_LOAD,
        "load_average_1_5_15": _load_average(),
    }


def versions(*packages: str) -> dict[str, str]:
    """Python, jax and jaxlib versions plus those of ``packages`` that are installed."""
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", *packages):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def code_state(package: str = "jaxstack") -> dict[str, Any]:
    """Which code was measured: the git commit of the checkout ``package`` is imported from
    and its files that differ from that commit (``git status --porcelain``), or the package's
    path where it is not in a git checkout."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return {"package": package, "path": None}
    where = Path(spec.origin).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.rstrip("\n") if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    if commit is None:
        return {"package": package, "path": str(where), "commit": None}
    status = git("status", "--porcelain", "--untracked-files=all", "--", ":/") or ""
    return {"commit": commit, "uncommitted": [line[3:] for line in status.splitlines()]}


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started (``argv``: the interpreter's arguments, default
    ``sys.orig_argv[1:]``), repeatable from the repository root: ``python -m module ...`` as
    given, ``python script.py ...`` with the script's path relative to the root."""
    argv = list(sys.orig_argv[1:] if argv is None else argv)
    index = 0
    while index < len(argv) and argv[index].startswith("-") and argv[index] != "-m":
        index += 2 if argv[index] in ("-X", "-W") else 1  # interpreter options
    if index < len(argv) and argv[index] != "-m":
        script = Path(argv[index]).resolve()
        if script.is_relative_to(REPO_ROOT):
            argv[index] = str(script.relative_to(REPO_ROOT))
    return shlex.join(["python", *argv[index:]])


# ----------------------------------------------------------------------------- result files
def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--results-dir`` (where ``write_result`` puts this run's file) to ``parser``."""
    parser.add_argument(
        "--results-dir",
        type=Path,
        help=f"where the run's JSON record goes (default: {RESULTS_DIR}; smoke runs: "
        f"{SMOKE_RESULTS_DIR})",
    )


def results_dir(requested: Path | None, smoke: bool) -> Path:
    """The directory a run records into: ``requested`` if given, else ``RESULTS_DIR``, or
    ``SMOKE_RESULTS_DIR`` for a smoke run (``--quick``), which is not a measurement to keep."""
    return requested or (SMOKE_RESULTS_DIR if smoke else RESULTS_DIR)


def make_record(name: str, report: dict, versions: dict[str, str]) -> dict[str, Any]:
    """``report`` wrapped with what makes it reproducible: the benchmark, command line, UTC
    date and time, machine, software versions and the measured code's git state."""
    return {
        "benchmark": name,
        "command": command_line(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions,
        "code": code_state(),
        "result": report,
    }


def write_result(
    name: str, report: dict, versions: dict[str, str], directory: Path | None = None
) -> Path:
    """Write ``make_record(name, report, versions)`` to ``directory`` (default
    ``RESULTS_DIR``) as ``<name>-<YYYY-MM-DD>-<8 hex digits of its SHA-256>.json``, print the
    record as JSON on stdout and the path on stderr; returns the path."""
    record = make_record(name, report, versions)
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    directory = Path(directory or RESULTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    path = directory / f"{name}-{record['date'][:10]}-{digest}.json"
    path.write_text(text)
    print(text, end="")
    print(f"wrote {path}", file=sys.stderr)
    return path


def load_results(results_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every record in ``results_dir`` (default ``RESULTS_DIR``), oldest first, each with its
    file name under ``"file"``.

    Raises:
        ValueError: a file is not a record written by ``write_result`` (names the file).
    """
    records = []
    for path in sorted(Path(results_dir or RESULTS_DIR).glob("*.json")):
        record = json.loads(path.read_text())
        missing = {"benchmark", "command", "date", "machine", "versions", "result"} - set(record)
        if missing:
            raise ValueError(f"{path} is not a benchmark record: it lacks {sorted(missing)}")
        records.append({**record, "file": path.name})
    return sorted(records, key=lambda record: record["date"])

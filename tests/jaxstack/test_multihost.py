"""Multi-host: 2 processes x 4 CPU devices (gloo) train and save; 1 process x 8 restores;
SIGTERM on one host stops both at one step; a held lock and a damaged checkpoint seen by one
process lead every process to the same outcome."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUICK_COMPILES = "--xla_backend_optimization_level=0"  # as the suite's own (conftest.py)


def _env(devices: int, **extra: str) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "XLA_"))
        or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))  # the suite's cache
    }
    repo = str(Path(__file__).parents[2])
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {QUICK_COMPILES}",
        PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def _two_processes(phase: str, work, out) -> list[subprocess.Popen]:
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), phase, "--work-dir", str(work), "--out", str(out)],
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip


def test_two_processes_train_and_one_process_restores(tmp_path):
    port = _free_port()
    work, copy = tmp_path / "run", tmp_path / "run_at_step3"
    multi_out, single_out = tmp_path / "multi.json", tmp_path / "single.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "train", "--work-dir", str(work),
             "--copy-dir", str(copy), "--out", str(multi_out)],
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    single = subprocess.run(
        [sys.executable, str(WORKER), "resume", "--work-dir", str(copy), "--out", str(single_out)],
        env=_env(8), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    multi = json.loads(multi_out.read_text())
    resumed = json.loads(single_out.read_text())
    assert (multi["processes"], multi["devices"]) == (2, 8)
    assert (resumed["processes"], resumed["devices"]) == (1, 8)
    assert [r["step"] for r in resumed["records"]] == [4]
    step4_multi = next(r for r in multi["records"] if r["step"] == 4)
    assert abs(step4_multi["loss"] - resumed["records"][0]["loss"]) < 1e-5


def test_sigterm_on_one_host_stops_every_process_at_the_same_saved_step(tmp_path):
    work, out = tmp_path / "run", tmp_path / "stopped"
    procs = _two_processes("preempt", work, out)
    metrics, deadline = work / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
        assert time.monotonic() < deadline, "the processes never trained"
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    stopped = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert stopped[0] == stopped[1] and stopped[0]["preempted"], stopped
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped[0]["step"] >= 3


def test_a_held_lock_and_damage_seen_by_one_process_end_alike_on_every_process(tmp_path):
    work, out = tmp_path / "run", tmp_path / "seen"
    procs = _two_processes("faults", work, out)
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    # the lock held on process 0 fails both processes before anything else, with its holder
    assert all(f'pid": {os.getpid()}' not in s["busy"] for s in seen)  # the worker held it
    assert "is in use by" in seen[0]["busy"] and seen[1]["busy"].startswith("process 0: ")
    assert all(s["busy_s"] < 30 for s in seen), seen
    # step 4 was damaged on process 1 only: both restored step 2, step 4 moved aside once
    assert [s["restored"] for s in seen] == [2, 2], seen
    assert seen[0]["moved"] == seen[1]["moved"] and len(seen[0]["moved"]) == 1, seen
    assert seen[0]["moved"][0].startswith("4-")
    assert "is damaged (on process 1: DATA_LOSS: injected" in logs[0]
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2]

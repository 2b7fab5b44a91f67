"""Multi-host: 2 processes x 4 CPU devices (gloo) train and save; 1 process x 8 restores."""

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


def _env(devices: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    repo = str(Path(__file__).parents[2])
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])),
        **extra,
    )
    return env


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
    port, work, out = _free_port(), tmp_path / "run", tmp_path / "stopped"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "preempt", "--work-dir", str(work), "--out", str(out)],
            env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]  # fmt: skip
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

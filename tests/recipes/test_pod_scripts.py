"""The pod scripts, as far as one machine can check them: their bash parses, and the very
`jaxstack train` command each launches runs as a 2-process job here (fake `srun` / `gcloud`
on PATH start it twice on this machine, each process with 4 fake CPU devices)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[2] / "recipes"
SCRIPTS = ["slurm_gpu.sbatch", "tpu_pod.sh"]
KEPT_JAX_VARIABLES = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE")  # the suite's cache
TINY_RUN = [
    "--model.num_layers", "2", "--data.seq_len", "32", "--data.max_files", "4",
    "--data.eval_examples", "8", "--train.num_steps", "2", "--train.batch_size", "8",
    "--train.save_every", "2", "--train.eval_every", "100", "--train.log_every", "1",
    "--train.progress_bar", "false",
]  # fmt: skip

# Each fake starts its command as 2 local processes and fails if either fails. `srun` runs
# its arguments under SLURM's environment (jaxstack finds the job through JAX's SLURM
# detection); `gcloud ... ssh --worker=all --command C` runs `bash -c C` with the JAX_*
# variables a pod's metadata would give.
FAKE = """#!{python}
import os, subprocess, sys
argv = sys.argv[1:]
if "{name}" == "gcloud":
    assert "--worker=all" in argv, argv
    command = ["bash", "-c", argv[argv.index("--command") + 1]]
    envs = [dict(JAX_COORDINATOR_ADDRESS="127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(rank)) for rank in range(2)]
else:
    command = [a for a in argv if not a.startswith("--kill-on-bad-exit")]
    envs = [dict(SLURM_JOB_ID="{port}", SLURM_NTASKS="2", SLURM_PROCID=str(rank),
                 SLURM_LOCALID=str(rank), SLURM_STEP_NODELIST="127.0.0.1") for rank in range(2)]
procs = [subprocess.Popen(command, env={{**os.environ, **env}}) for env in envs]
sys.exit(max(p.wait() for p in procs))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(RECIPES / script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_launched_command_trains_on_two_local_processes(script, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # SLURM derives its coordinator port from the job id: 61440 + id % 4096
    port = _free_port() if script == "tpu_pod.sh" else 61440 + os.getpid() % 4096
    name = "gcloud" if script == "tpu_pod.sh" else "srun"
    fake = bin_dir / name
    fake.write_text(FAKE.format(python=sys.executable, name=name, port=port))
    fake.chmod(0o755)
    work_dir = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "XLA_", "SLURM_")) or k.startswith(KEPT_JAX_VARIABLES)
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        JAX_PLATFORMS="cpu",
        # quick compiles, as conftest.py sets for the suite
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
        TPU_NAME="test-pod",
        ZONE="local",
        WORK_DIR=str(work_dir),
        PACKAGE="jaxstack",  # installed already: pip has nothing to fetch
    )
    args = TINY_RUN if name == "gcloud" else [*TINY_RUN, "--train.work_dir", str(work_dir)]
    result = subprocess.run(
        ["bash", str(RECIPES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "process 0 of 2, 4 of 8 devices" in result.stdout
    assert "process 1 of 2, 4 of 8 devices" in result.stdout
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (work_dir / "checkpoints" / "2").is_dir()

"""The checkpoint benchmark: a smoke run records both trainers, the save's parts and a
bit-identical restore, and its record makes a table row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from jaxstack.models.llama import preset

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_records_overhead_save_parts_and_restore(tmp_path):
    command = [sys.executable, "benchmarks/checkpoint.py", "--quick"]
    command += ["--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("checkpoint-*.json")
    record = json.loads(path.read_text())
    assert json.loads(done.stdout) == record  # the JSON on stdout is the file
    assert record["command"].startswith("python benchmarks/checkpoint.py --quick")
    assert "orbax-checkpoint" in record["versions"]
    result = record["result"]
    setup = result["setup"]
    assert setup["quick"] and setup["params"] == preset("tiny").num_params()

    trainers = result["trainers"]
    assert set(trainers) == {"save_every_step", "no_save"}
    for trainer in trainers.values():
        assert len(trainer["step_s"]) == setup["steps"] and trainer["median_step_s"] > 0
    # the same model, batch and update: the two trainers' losses agree
    assert trainers["save_every_step"]["loss_first_last"] == pytest.approx(
        trainers["no_save"]["loss_first_last"]
    )
    # every step updates the state in place, also the one after a save: on CPU jaxstack
    # writes a staged copy, not the buffers the next step donates
    assert trainers["no_save"]["donated_fraction"] == 1.0
    assert trainers["save_every_step"]["donated_fraction"] == 1.0
    medians = [trainers[name]["median_step_s"] for name in ("save_every_step", "no_save")]
    assert result["overhead"] == pytest.approx(medians[0] / medians[1] - 1)

    assert len(result["save_blocked_s"]) == len(result["save_waited_s"]) == setup["steps"]
    assert len(result["isolated_saves"]) == setup["isolated_saves"]
    alone = result["median_isolated_save"]
    assert 0 < alone["blocked_s"] <= alone["total_s"] and alone["cpu_s"] > 0
    checkpoint = result["checkpoint"]
    assert checkpoint["state_bytes"] > 0 and checkpoint["bytes_on_disk"] > 0
    assert checkpoint["codecs"] and checkpoint["checkpoints_kept"] == setup["keep_checkpoints"]
    assert result["memcpy_bytes_per_sec"] > 0 and result["finite_check_s"] > 0
    codecs = result["orbax_codecs"]
    assert set(codecs) == {"zstd", "none"}
    for codec in codecs.values():
        assert codec["save_s"] > 0 and codec["restore_s"] > 0 and codec["bytes_on_disk"] > 0

    restore = result["restore"]
    assert restore["bit_identical"] and restore["restored_step"] == restore["step"]
    assert restore["restore_s"] > 0 and restore["restore_bytes_per_sec"] > 0

    # a full (not smoke) run of this shape makes one table row
    record["result"]["setup"]["quick"] = False
    table = report.checkpoint_table([{**record, "file": path.name}])
    (row,) = [line for line in table.splitlines() if line.startswith("| tiny, 2 x 32")]
    assert path.name in row and ", ".join(checkpoint["codecs"]) in row

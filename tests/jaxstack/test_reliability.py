"""Fault drills: preemption, damaged checkpoints, non-finite steps, a second writer, failing
saves, bad configs and duplicate metrics after a resume (issue: training never loses work)."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_setup import lm_trainer, packed_dataset

from jaxstack.checkpoint import DAMAGED_DIR, CheckpointError, CheckpointManager
from jaxstack.cli import main
from jaxstack.data import lm_collate
from jaxstack.trainer import NonFiniteError
from jaxstack.workdir import WorkDirBusyError, WorkDirLock

REPO = Path(__file__).parents[2]
RUN = [
    "--data.max_files", "8", "--data.seq_len", "64", "--data.eval_examples", "8",
    "--train.batch_size", "8", "--train.log_every", "1", "--train.progress_bar", "false",
    "--train.schedule", "constant", "--train.warmup_steps", "0",
    "--model.num_layers", "1", "--model.hidden_size", "64", "--model.intermediate_size", "128",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset():
    return packed_dataset()


def _cli(work_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxstack.cli", "train", "--train.work_dir", str(work_dir),
            *RUN, *extra]  # fmt: skip


def _records(work_dir: Path) -> list[dict]:
    path = work_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_saves_the_step_and_resume_continues_identically(tmp_path, capsys):
    work = tmp_path / "preempted"
    proc = subprocess.Popen(
        _cli(work, "--train.num_steps", "100000", "--train.save_every", "100000"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for = random.Random().randint(2, 6)
    deadline = time.monotonic() + 300
    while len(_records(work)) < wait_for:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = [r["step"] for r in _records(work)]
    stopped = steps[-1]
    assert f"stopped by SIGTERM at step {stopped}" in err
    assert CheckpointManager(work / "checkpoints").all_steps() == [stopped]

    # resume to two more steps; a straight run to the same step logs the same losses
    target = str(stopped + 2)
    assert main(_cli(work, "--train.num_steps", target)[3:]) == 0
    assert "resuming from step" in capsys.readouterr().err
    straight = tmp_path / "straight"
    assert main(_cli(straight, "--train.num_steps", target)[3:]) == 0
    resumed_losses = [r["loss"] for r in _records(work)]
    assert [r["step"] for r in _records(work)] == list(range(1, stopped + 3))
    assert resumed_losses == [r["loss"] for r in _records(straight)]


SLOW_FINAL_SAVE = """
import sys, time
import flax.linen as nn, jax.numpy as jnp, numpy as np
import jaxstack as js
from jaxstack.checkpoint import CheckpointManager

save = CheckpointManager.save

def slow_save(self, step, state, data_state, *, force=False):
    if force:  # the final save (regular ones are never due)
        print("saving", flush=True)
        time.sleep(100)
    return save(self, step, state, data_state, force=force)

CheckpointManager.save = slow_save
model = nn.Dense(2)
js.Trainer(
    params=lambda rng: model.init(rng, jnp.zeros((1, 4)))["params"],
    collate_fn=lambda examples: {"x": np.stack(examples)},
    loss_fn=lambda params, batch, rng: jnp.mean(model.apply({"params": params}, batch["x"])**2),
    config=js.TrainConfig(work_dir=sys.argv[1], batch_size=8, num_steps=10**6,
                          save_every=10**6, log_every=1, progress_bar=False,
                          preemption_grace_s=float(sys.argv[2])),
).fit([np.ones(4, np.float32)] * 16)
"""


@pytest.mark.parametrize("second_signal", [False, True])
def test_the_grace_period_covers_the_final_save(tmp_path, second_signal):
    """SIGTERM's save runs under the watchdog: a save that outlasts the grace period exits
    non-zero saying so, and a second signal during it exits at once."""
    grace = "60" if second_signal else "2"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_FINAL_SAVE, str(tmp_path), grace],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not _records(tmp_path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never logged"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert "saving\n" in iter(proc.stdout.readline, "")  # after the run's log lines
    signalled = time.monotonic()
    if second_signal:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if second_signal:
        assert proc.returncode == 128 + signal.SIGINT, err
        assert "second SIGINT: exiting now, without a save" in err
    else:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "did not finish within 2s (preemption_grace_s); exiting without it" in err
    assert time.monotonic() - signalled < 30  # not the 100 s the save would take


def _damage(step_dir: Path, how: str) -> None:
    data_files = sorted((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    if how == "truncated":
        largest = data_files[-1]
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    elif how == "zeroed":
        largest = data_files[-1]
        largest.write_bytes(bytes(largest.stat().st_size))
    elif how == "no-metadata":
        (step_dir / "state" / "_METADATA").unlink()
    else:
        shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated", "zeroed", "no-metadata", "no-state"])
def test_a_damaged_latest_checkpoint_is_moved_aside_for_the_previous_one(tmp_path, dataset, how):
    first = lm_trainer(tmp_path, num_steps=4, save_every=2, keep_checkpoints=5)
    first.fit(dataset)
    first.close()
    _damage(tmp_path / "checkpoints" / "4", how)
    resumed = lm_trainer(tmp_path, num_steps=5, save_every=2, keep_checkpoints=5)
    resumed.fit(dataset)
    resumed.close()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5]  # 3, 4 redone once
    moved = list((tmp_path / DAMAGED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("4-")  # kept, never deleted
    assert CheckpointManager(tmp_path / "checkpoints").all_steps() == [2, 4, 5]


def test_no_intact_checkpoint_is_one_clear_error(tmp_path, dataset):
    first = lm_trainer(tmp_path, num_steps=2, save_every=2)
    first.fit(dataset)
    first.close()
    _damage(tmp_path / "checkpoints" / "2", "zeroed")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        lm_trainer(tmp_path, num_steps=4).fit(dataset)


def _poisoned(dataset, from_example: int):
    """The examples, each with a ``poison`` flag set from ``from_example`` on."""
    return [dict(dataset[i], poison=np.int32(i >= from_example)) for i in range(len(dataset))]


def _poison_collate(examples):
    batch = lm_collate([{k: v for k, v in e.items() if k != "poison"} for e in examples])
    return {**batch, "poison": np.stack([e["poison"] for e in examples])}


def _nan_trainer(work_dir, **config):
    trainer = lm_trainer(work_dir, shuffle=False, save_every=2, keep_checkpoints=1, **config)
    lm_loss = trainer.loss_fn

    def loss_fn(params, batch, rng):
        loss, metrics = lm_loss(params, {k: v for k, v in batch.items() if k != "poison"}, rng)
        return loss * jnp.where(batch["poison"].any(), jnp.nan, 1.0), metrics

    trainer.loss_fn, trainer.collate_fn = loss_fn, _poison_collate
    return trainer


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_nan_run_stops_keeping_the_last_finite_checkpoint(tmp_path, dataset, policy):
    data = _poisoned(dataset, from_example=3 * 16)  # steps 1-3 clean, 4 on poisoned
    trainer = _nan_trainer(tmp_path, num_steps=20, nonfinite=policy, max_nonfinite_skips=2)
    with pytest.raises(NonFiniteError, match="non-finite"):
        trainer.fit(data)
    stopped_at = trainer.step
    trainer.close()
    kept = CheckpointManager(tmp_path / "checkpoints").all_steps()
    if policy == "stop":
        assert stopped_at == 4 and kept == [2]  # step 4's save came after the check
    else:
        assert stopped_at == 5 and kept == [4]  # step 4 skipped its update: finite, saved
    params = jax.tree.leaves(jax.device_get(trainer.state.params))
    assert all(np.isfinite(p).all() for p in params)  # updates from NaN never applied
    records = _records(tmp_path)
    assert [r["skipped"] for r in records] == [0, 0, 0, 1] + ([1] if policy == "skip" else [])


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, dataset):
    holder = WorkDirLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(WorkDirBusyError, match=f"pid.*{os.getpid()}"):
            lm_trainer(tmp_path, num_steps=1, warmup_steps=0).fit(dataset)
    finally:
        holder.release()
    # the lock file stays behind with a holder that is gone: the next run takes over
    assert (tmp_path / ".lock").exists()
    trainer = lm_trainer(tmp_path, num_steps=1, warmup_steps=0)
    trainer.fit(dataset)
    trainer.close()
    assert trainer.step == 1


def _read_only_checkpoints(work: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``work/checkpoints`` read-only: a read-only bind mount in a private
    mount namespace where this machine allows one, else a file standing where the
    directory should be (the save fails with the same kind of OSError)."""
    checkpoints = work / "checkpoints"
    checkpoints.mkdir(parents=True)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if shutil.which("unshare") and probe.returncode == 0:
        script = f'mount --bind -o ro {checkpoints} {checkpoints} && exec "$@"'
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    checkpoints.rmdir()
    checkpoints.write_text("not a directory")
    return argv


def _assert_fails_fast_with_one_line(argv: list[str], **popen) -> str:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, **popen)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # start-up and compilation included; a run that hangs on exit takes minutes
    assert time.monotonic() - start < 120
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_a_read_only_checkpoint_dir_fails_at_once_with_one_line(tmp_path):
    work = tmp_path / "run"
    argv = _cli(work, "--train.num_steps", "1000", "--train.save_every", "2")
    line = _assert_fails_fast_with_one_line(_read_only_checkpoints(work, argv))
    assert str(work / "checkpoints") in line and "failed" in line
    assert "Traceback" in (work / "error.log").read_text()
    assert len(_records(work)) <= 3  # it stopped at the first save, not many steps later


def _small_files_only():
    # metrics lines and error.log (Orbax's tracebacks of the failed write, ~40 KB) fit; the
    # checkpoint's largest data file (~1.8 MB) does not
    limit = 256 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG


def test_a_full_disk_leaves_no_partial_checkpoint(tmp_path):
    work = tmp_path / "run"
    argv = _cli(work, "--train.num_steps", "1000", "--train.save_every", "2",
                "--model.hidden_size", "128")  # fmt: skip
    line = _assert_fails_fast_with_one_line(argv, preexec_fn=_small_files_only)
    assert "failed" in line
    leftovers = [p.name for p in (work / "checkpoints").iterdir()]
    assert not [name for name in leftovers if "tmp" in name], leftovers
    assert CheckpointManager(work / "checkpoints").all_steps() == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--train.learning_rate", "nan"], "learning_rate=nan must be a finite number >= 0"),
        (["--train.learning_rate", "-1"], "learning_rate=-1.0 must be a finite number >= 0"),
        (["--train.keep_checkpoints", "0"], "keep_checkpoints=0 must be >= 1"),
        (["--data.seq_len", "4096"], "data.seq_len=4096 exceeds model.max_seq_len=512"),
        (["--train.batch_size", "8", "--train.per_device_batch_size", "1"], "not both"),
    ],
)
def test_bad_configs_are_one_line_each(tmp_path, capsys, override, message):
    assert main(["train", "--train.work_dir", str(tmp_path), *override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_json_value_of_the_wrong_type_names_its_key(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train": {"num_steps": "ten"}}))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "TrainConfig.num_steps='ten': expected int or None" in err and len(err.splitlines()) == 1


def test_another_model_or_data_in_the_work_dir_is_refused_unless_asked(tmp_path, capsys):
    work = tmp_path / "run"
    base = ["train", "--train.work_dir", str(work), *RUN, "--train.num_steps", "2"]
    assert main(base) == 0
    assert main([*base, "--model.hidden_size", "96"]) == 2
    assert "another model (differs in model.hidden_size)" in capsys.readouterr().err
    assert main([*base, "--data.max_files", "9"]) == 2
    assert "--resume continues" in capsys.readouterr().err
    assert main([*base, "--data.max_files", "9", "--train.num_steps", "3", "--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    bigger = [*base, "--model.hidden_size", "96"]
    assert main([*bigger, "--overwrite"]) == 0
    assert list(work.glob("replaced-*/checkpoints"))  # the old run is kept, moved aside
    assert main(bigger) == 0  # same config, already at num_steps: says so, trains nothing
    assert "nothing to train" in capsys.readouterr().err


def test_metrics_hold_each_step_once_after_a_resume(tmp_path, dataset):
    first = lm_trainer(tmp_path, num_steps=6, save_every=4)
    first.fit(dataset)
    first.close()
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # as if killed after logging step 6
    resumed = lm_trainer(tmp_path, num_steps=7, save_every=4)
    resumed.fit(dataset)
    resumed.close()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]

"""Work dirs as paths or URLs: file:// is the local path it names; a remote URL stays a URL
and is either reachable or refused at once with what to install; a file system without flock
is said in one line, a lock file that cannot be made is one clear error."""

import errno
import fcntl
import json
import os
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath

import jaxstack as js
from jaxstack.workdir import (
    WorkDirLock,
    WorkDirLockError,
    WorkDirUnreachableError,
    is_local,
    work_path,
)

MODEL = nn.Dense(3)


def _trainer(work_dir: str, num_steps: int) -> js.Trainer:
    def collate_fn(examples):
        return {
            "x": np.stack([e["x"] for e in examples]),
            "y": np.array([e["y"] for e in examples]),
        }

    def loss_fn(params, batch, rng):
        logits = MODEL.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def pred_fn(params, batch, rng):
        return {"y": MODEL.apply({"params": params}, batch["x"]).argmax(-1)}

    return js.Trainer(
        params=lambda rng: MODEL.init(rng, jnp.zeros((1, 4)))["params"],
        collate_fn=collate_fn,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=js.TrainConfig(
            work_dir=work_dir, batch_size=8, num_steps=num_steps, save_every=2,
            log_every=1, progress_bar=False,
        ),
    )  # fmt: skip


EXAMPLES = [{"x": np.full(4, i % 3, np.float32), "y": i % 3} for i in range(32)]


def test_local_spellings_resolve_to_one_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spelling in ("runs/x", str(tmp_path / "runs" / "x"), f"file://{tmp_path}/runs/x"):
        path = work_path(spelling)
        assert is_local(path) and str(path) == str(tmp_path / "runs" / "x")


def test_file_url_work_dir_trains_saves_and_resumes(tmp_path):
    url = f"file://{tmp_path}/run"
    trainer = _trainer(url, num_steps=2)
    trainer.fit(EXAMPLES)
    trainer.close()
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert not any(p.name.startswith("file:") for p in tmp_path.rglob("*"))
    resumed = _trainer(url, num_steps=4)
    resumed.fit(EXAMPLES)
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_remote_urls_stay_urls():
    assert not is_local(epath.Path("gs://bucket/run"))
    assert str(epath.Path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"


def test_unreachable_remote_work_dir_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on a machine without gcsfs
    with pytest.raises(WorkDirUnreachableError, match=r"gs://bucket/run cannot be reached.*gcsfs"):
        _trainer("gs://bucket/run", num_steps=2).fit(EXAMPLES)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_file_system_without_flock_proceeds_with_one_warning(tmp_path, monkeypatch, capsys):
    def no_flock(handle, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # as on Lustre mounted without -o flock
    lock, before = WorkDirLock(tmp_path), _open_fds()
    lock.acquire()
    lock.release()
    assert _open_fds() == before  # the lock file's handle is not leaked
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "file system has no flock" in err, err


def test_a_lock_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / ".lock").mkdir()  # the lock file cannot be opened
    with pytest.raises(WorkDirLockError, match=r"cannot create the lock file .*\.lock"):
        WorkDirLock(tmp_path).acquire()

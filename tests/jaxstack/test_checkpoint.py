"""CheckpointManager on a small state: each save holds the state of its step although the
state is then updated in place, checkpoints of the earlier (zstd) format still restore, and a
restore moves a checkpoint aside only on proof of damage (faults injected into Orbax's reads)."""

import functools
import gc
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.serialization import serialization

import jaxstack as js
from jaxstack import checkpoint
from jaxstack.checkpoint import DAMAGED_DIR, CheckpointManager, CheckpointMismatchError

NOISE = ("Exception ignored", "Event loop is closed", "never retrieved", "Traceback")


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((37, 5)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(11), jnp.bfloat16),
        "step": jnp.asarray(seed, jnp.int32),
    }


@functools.partial(jax.jit, donate_argnums=0)
def _update(state: dict) -> dict:
    return jax.tree.map(lambda x: x + 1, state)


def _assert_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_each_save_holds_its_step_while_the_state_is_updated_in_place(tmp_path):
    manager = CheckpointManager(tmp_path, save_every=1, keep=3)
    state = _state(1)
    expected = {}
    for step in (1, 2, 3):
        expected[step] = jax.tree.map(np.array, state)
        assert manager.save(step, state, {"position": step})
        before = state["w"]
        state = _update(state)  # may overwrite the saved arrays unless the save staged them
        assert before.is_deleted()  # the update reused the buffers: nothing held them
    manager.wait()
    for step, saved in expected.items():
        restored, data = manager.restore(_state(0), step)
        _assert_equal(restored, saved)
        assert data == {"position": step}
    manager.close()


def test_a_checkpoint_of_the_earlier_zstd_format_restores(tmp_path):
    state = _state(4)
    earlier = ocp.CheckpointManager(
        tmp_path,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        },
    )
    earlier.save(
        7,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"position": 3})
        ),
    )
    earlier.close()
    manager = CheckpointManager(tmp_path)
    step, restored, data = manager.restore_latest(_state(0))
    assert step == 7 and data == {"position": 3}
    _assert_equal(restored, state)
    manager.close()


@pytest.fixture
def two_steps(tmp_path):
    """A directory with checkpoints of ``_state`` at steps 1 and 2."""
    manager = CheckpointManager(tmp_path, save_every=1)
    for step in (1, 2):
        manager.save(step, _state(step), {"position": step})
    manager.close()
    return tmp_path


@pytest.fixture
def quiet(monkeypatch, capfd):
    """Asserts, after the test, that nothing reached the console or passed the checkpoint
    module's filter of Python's unraisable hook (where abandoned asyncio coroutines of a
    failed read are reported)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", checkpoint._quiet_orbax(unraisable.append))
    yield
    gc.collect()
    assert not unraisable, [u.exc_value for u in unraisable]
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if any(n in line for n in NOISE)], err


def _assert_untouched(directory) -> None:
    assert CheckpointManager(directory).all_steps() == [1, 2]
    assert not (directory.parent / DAMAGED_DIR).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {**s, "w": jnp.zeros((37, 6))},
         r"w: checkpoint \(37, 5\) float32, this run \(37, 6\) float32"),
        (lambda s: {**s, "b": s["b"].astype(jnp.float32)},
         r"b: checkpoint \(11,\) bfloat16, this run \(11,\) float32"),
        (lambda s: {**s, "extra": jnp.zeros(2)}, "extra: only in this run"),
    ],
)  # fmt: skip
def test_a_changed_shape_dtype_or_tree_is_a_mismatch_that_moves_nothing(
    two_steps, quiet, change, message
):
    manager = CheckpointManager(two_steps)
    with pytest.raises(CheckpointMismatchError, match=f"{message}.*--overwrite.*nothing was moved"):
        manager.restore_latest(change(_state(0)))
    manager.close()
    _assert_untouched(two_steps)


def _failing_reads(monkeypatch, error: Exception, times: int) -> list[int]:
    """Orbax's shard reads raise ``error`` the first ``times`` times; returns the count."""
    calls, read_shard = [], serialization._read_shard

    async def read(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise error
        return await read_shard(*args, **kwargs)

    monkeypatch.setattr(serialization, "_read_shard", read)
    monkeypatch.setattr(checkpoint, "RETRY_DELAY_S", 0.01)
    return calls


def test_a_transient_read_error_is_retried_then_restores(two_steps, monkeypatch, capfd, quiet):
    _failing_reads(monkeypatch, ValueError("UNAVAILABLE: injected: connection reset"), times=1)
    manager = CheckpointManager(two_steps)
    step, restored, data = manager.restore_latest(_state(0))
    assert step == 2 and data == {"position": 2}
    _assert_equal(restored, jax.tree.map(np.array, _state(2)))
    assert "UNAVAILABLE: injected: connection reset); retrying" in capfd.readouterr().err
    # one that does not pass is raised as it is, after READ_ATTEMPTS reads, moving nothing
    calls = _failing_reads(monkeypatch, TimeoutError("injected: storage timeout"), times=99)
    with pytest.raises(TimeoutError, match="storage timeout"):
        manager.restore_latest(_state(0))
    assert 0 < len(calls) <= 3 * checkpoint.READ_ATTEMPTS  # each read fails at its first shard
    manager.close()
    _assert_untouched(two_steps)


def test_out_of_memory_during_restore_is_raised_as_such_and_moves_nothing(
    two_steps, monkeypatch, quiet
):
    oom = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory allocating 2.00GiB (injected)"
    )
    _failing_reads(monkeypatch, oom, times=1)  # one read fails, the others are abandoned
    manager = CheckpointManager(two_steps)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as raised:
        manager.restore_latest(_state(0))
    assert raised.value is oom
    manager.close()
    _assert_untouched(two_steps)


def _dense_trainer(work_dir, width: int) -> js.Trainer:
    model = nn.Dense(width)

    def loss_fn(params, batch, rng):
        return jnp.mean((model.apply({"params": params}, batch["x"]) - 1.0) ** 2)

    return js.Trainer(
        params=lambda rng: model.init(rng, jnp.zeros((1, 4)))["params"],
        collate_fn=lambda examples: {"x": np.stack(examples)},
        loss_fn=loss_fn,
        config=js.TrainConfig(work_dir=str(work_dir), batch_size=8, num_steps=4, save_every=2,
                              log_every=1, progress_bar=False),
    )  # fmt: skip


def test_resuming_a_wider_model_is_one_clear_error_through_the_trainer(tmp_path, quiet):
    data = [np.full(4, i, np.float32) for i in range(16)]
    first = _dense_trainer(tmp_path, width=3)
    first.fit(data)
    first.close()
    with pytest.raises(CheckpointMismatchError, match=r"params/kernel: checkpoint \(4, 3\)"):
        _dense_trainer(tmp_path, width=5).fit(data)
    assert CheckpointManager(tmp_path / "checkpoints").all_steps() == [2, 4]
    assert not (tmp_path / DAMAGED_DIR).exists()

"""CheckpointManager on a small state: each save holds the state of its step although the
state is then updated in place, and checkpoints of the earlier (zstd) format still restore."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxstack.checkpoint import CheckpointManager


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

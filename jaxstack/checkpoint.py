"""Orbax checkpoints of a training run: state (params, optimizer, step, RNG) + data position.

Layout under ``<work_dir>/checkpoints/<step>/``: ``state`` (a PyTree of arrays, restorable
onto any mesh by giving the target shardings) and ``data`` (the loader position, JSON).
"""

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointManager:
    """Asynchronous saves every ``save_every`` steps (and on demand), keeping the last ``keep``."""

    def __init__(self, directory: str | Path, *, save_every: int = 1000, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Start an async save of ``state`` and ``data_state`` if ``step`` is due (or forced)."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, data_state)`` at ``step`` (default latest) onto ``target``'s shardings.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays; the
        saved arrays are resharded onto it, so a checkpoint restores onto a different mesh.
        """
        step = self._resolve(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target)), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        """Block until every pending async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def _resolve(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoint in {self.directory}; train first (jaxstack train) or point to "
                "the work dir of a run that saved one"
            )
        if step is None:
            return max(steps)
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: {sorted(steps)}"
            )
        return step


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: (
            x
            if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        ),
        tree,
    )


def load_params(work_dir: str | Path, target: Any | None = None, step: int | None = None) -> Any:
    """Load only the parameters of a run's checkpoint (for inference): one call.

    ``target`` (optional) is a params pytree of arrays or ``ShapeDtypeStruct`` giving the
    shapes and shardings to restore onto; without it the params land on the first device.
    """
    directory = Path(work_dir).absolute() / "checkpoints"
    if not directory.exists():
        raise FileNotFoundError(
            f"no checkpoints directory at {directory}; pass the work dir of a training run"
        )
    manager = CheckpointManager(directory)
    item = directory / str(manager._resolve(step)) / "state"
    manager.close()
    checkpointer = ocp.PyTreeCheckpointer()
    if target is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        saved = checkpointer.metadata(item).item_metadata.tree["params"]
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved
        )
    target = {"params": _abstract(target)}
    restored = checkpointer.restore(
        item,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return restored["params"]

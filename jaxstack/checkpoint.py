"""Orbax checkpoints of a training run: state (params, optimizer, step, RNG) + data position.

Layout under ``<work_dir>/checkpoints/<step>/``: ``state`` (a PyTree of arrays, restorable
onto any mesh by giving the target shardings) and ``data`` (the loader position, JSON).

Reliability (restore):

- A checkpoint is moved aside only on proof of damage: a missing, truncated or zeroed file,
  missing or unreadable metadata, a checksum or format error. ``restore_latest`` then moves it
  into ``<work_dir>/checkpoints.damaged/`` (never deleting it), says so in one line, and falls
  back to the next newest; with none intact it raises ``CheckpointError``.
- A checkpoint that does not match the model (tree, shapes or dtypes, read from its metadata
  before any array is read) is ``CheckpointMismatchError``, naming the first differing
  parameters and what to do. Out of memory (``RESOURCE_EXHAUSTED``) is raised as it is;
  transient storage errors (``UNAVAILABLE``, timeouts, ``EIO``, ...) are retried
  ``READ_ATTEMPTS`` times, then raised as they are; so is any error that proves nothing.
  None of these moves anything.
- With several processes, every process reads the same step (process 0's choice) and all
  agree (``distributed.share``) before anything is renamed: one process's damage moves the
  checkpoint aside for all (process 0 renames it); one process's other error is raised on
  every process, moving nothing.
- Orbax reads and writes run as asyncio tasks; when one fails, the others are abandoned and
  Python would report them on the console whenever they are collected, in any thread
  ("Exception ignored in: <coroutine ...>", "Event loop is closed", "Task exception was never
  retrieved"). A ``CheckpointManager`` filters those reports (it wraps ``sys.unraisablehook``
  as set when it is made, and filters the ``asyncio`` logger; for errors from Orbax or
  TensorStore code and closed event loops) into the ``jaxstack.background`` log at debug
  level; the error raised says what failed.

Reliability (save):

- ``remove_unfinished`` removes temporary directories of saves that never finished (the
  Trainer calls it on start, holding the work dir's lock).
- A save that fails (read-only or full disk, ...) raises ``CheckpointError`` naming the path
  and the cause, at once when it fails on the spot or at the next ``check()`` when the
  asynchronous part fails, and leaves no partial checkpoint a restart would use.

Storage: the state's arrays are stored uncompressed, as Zarr v3 shards whose index carries a
CRC32C checksum, inside Orbax's OCDBT files. A truncated or zeroed data file then fails to
read, so damage is detected as with Orbax's default zstd; neither reliably notices flipped bits in
the array data. zstd saved about a fifth of the bytes of a float32 training state but
multiplied the CPU time of the background write about fivefold, and on a CPU host that time is
taken from the training step (``benchmarks/checkpoint.py``, docs/benchmarks.md).

Cost: a save blocks the caller while Orbax takes a host view of the arrays; the write runs in
the background. On CPU, where device memory is host memory, that view is the state's own
buffers: the next (donating) step could not reuse them and would allocate and page-fault a
whole new state. So on CPU a save first copies the state into staging buffers kept between
saves (one state of RAM, the same peak as without them) and writes those; the step then
updates the state in place. A save waits for the previous write first, since it refills the
buffers that write reads.
"""

import atexit
import contextlib
import datetime
import errno
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from jaxstack.distributed import share
from jaxstack.workdir import work_path
from sharding_rules.paths import leaves_with_paths

DAMAGED_DIR = "checkpoints.damaged"
READ_ATTEMPTS = 3
"""Reads of a checkpoint before a transient storage error is raised (module doc)."""
RETRY_DELAY_S = 0.5
"""Wait before the first retry; it doubles for each next one."""
_LOG = logging.getLogger("jaxstack.background")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none could be read."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's files prove it damaged (missing, truncated, checksum or format error)."""

    def __init__(self, path: epath.Path, cause: str):
        super().__init__(f"checkpoint {path} is damaged: {cause}")
        self.cause = cause


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another state than the one asked for (tree, shapes or dtypes)."""


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    """The state as uncompressed Zarr v3 (module doc: checksummed shard index), the data
    position as JSON. Reading takes the format from the files, so older zstd checkpoints
    restore too."""
    state = ocp.PyTreeCheckpointHandler(use_zarr3=True, use_compression=False)
    return {"state": state, "data": ocp.JsonCheckpointHandler()}


def _restore_args(item: Any, **kwargs: Any) -> ocp.args.PyTreeRestore:
    """Orbax arguments restoring the arrays of ``item`` (``ShapeDtypeStruct``-s with
    shardings) straight into their placement."""
    return ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), **kwargs
    )


@functools.partial(jax.jit, donate_argnums=0)
def _copy_into(staging: list[jax.Array], arrays: list[jax.Array]) -> list[jax.Array]:
    """``arrays`` written into the (donated) buffers of ``staging``: no new allocation."""
    return [buffer.at[...].set(x) for buffer, x in zip(staging, arrays, strict=True)]


_copy = jax.jit(lambda arrays: [jnp.copy(x) for x in arrays])


class CheckpointManager:
    """Asynchronous saves every ``save_every`` steps (and on demand), keeping the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int = 3):
        self.directory = work_path(directory)
        self.save_every = save_every
        self._staging: tuple[Any, list[jax.Array]] | None = None
        self._readers = _handlers()
        self._discard_at_exit = False
        _quiet_orbax_noise()  # failed reads and writes abandon asyncio work, collected any time
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=_handlers()
            )
        except OSError as error:
            raise CheckpointError(_describe(self.directory, error)) from error

    def remove_unfinished(self) -> None:
        """Delete temporary directories that interrupted saves left behind (only the one
        writer of the directory may call this: another's save in flight looks the same)."""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if ".orbax-checkpoint-tmp" in path.name:
                with contextlib.suppress(OSError):  # best effort: the next start retries
                    path.rmtree(missing_ok=True)

    def _discard_failed_save(self) -> None:
        """Remove what a failed save left, now and again when the process exits: TensorStore
        may still finish writes the failed save started, and they recreate its directory."""
        self.remove_unfinished()
        if not self._discard_at_exit:
            atexit.register(self.remove_unfinished)
            self._discard_at_exit = True

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due: a multiple of ``save_every``."""
        return step % self.save_every == 0

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Start an async save of ``state`` and ``data_state`` if ``step`` is due (or forced).

        Raises:
            CheckpointError: the save (or an earlier asynchronous one) failed.
        """
        self.check()
        if not (force or self.should_save(step)):
            return False
        try:
            self._probe_writable()
            self._manager.wait_until_finished()  # the previous write reads the staging buffers
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(self._staged(state)),
                    data=ocp.args.JsonSave(data_state),
                ),
                force=True,
            )
        except Exception as error:  # orbax / tensorstore / OS errors alike
            self._discard_failed_save()
            raise CheckpointError(_describe(self.directory / str(step), error)) from error

    def _staged(self, state: Any) -> Any:
        """``state`` with its CPU arrays copied into the staging buffers (module doc); the
        buffers are reused from the previous save when the arrays match it, else made anew.
        States with arrays off the CPU are returned as they are: a host copy is taken anyway."""
        leaves, treedef = jax.tree.flatten(state)
        staged = [i for i, x in enumerate(leaves) if _stageable(x)]
        if not staged or any(
            device.platform != "cpu" for i in staged for device in leaves[i].devices()
        ):
            return state
        arrays = [leaves[i] for i in staged]
        key = (treedef, [(x.shape, x.dtype, x.sharding) for x in arrays])
        if self._staging is not None and self._staging[0] == key:
            buffers = _copy_into(self._staging[1], arrays)
        else:
            self._staging = None  # free the old buffers first
            buffers = _copy(arrays)
        self._staging = (key, buffers)
        for i, buffer in zip(staged, buffers, strict=True):
            leaves[i] = buffer
        return jax.tree.unflatten(treedef, leaves)

    def _probe_writable(self) -> None:
        """Fail on the spot where the directory cannot be written (read-only, no permission,
        not a directory): an asynchronous save would fail in a background thread instead."""
        self.directory.mkdir(parents=True, exist_ok=True)
        probe = self.directory / f".probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()

    def check(self) -> None:
        """Raise ``CheckpointError`` if an asynchronous save has failed (cheap, no waiting)."""
        try:
            self._manager.check_for_errors()
        except Exception as error:
            self._discard_failed_save()
            raise CheckpointError(_describe(self.directory, error)) from error

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``(state, data_state)`` at ``step`` (default latest) onto ``target``'s shardings.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) or arrays; the
        saved arrays are resharded onto it, so a checkpoint restores onto a different mesh.

        Raises:
            FileNotFoundError: no checkpoint (at ``step``).
            CheckpointMismatchError: the checkpoint's tree, shapes or dtypes are not ``target``'s.
            CheckpointDamagedError: the checkpoint's files prove it damaged.
            Exception: out of memory, a transient error that outlasted ``READ_ATTEMPTS``, or
                another error that proves nothing, as raised.
        """
        return self._read(_resolve(self.directory, self.all_steps(), step), target)

    def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
        """``(step, state, data_state)`` from the newest intact checkpoint, or None if there is
        none at all; damaged ones are moved aside, and every process restores the same step
        (module doc).

        Raises:
            CheckpointError: checkpoints exist but none can be read, or another process could
                not restore the agreed step.
            CheckpointMismatchError: the newest checkpoint holds another model's state.
            Exception: out of memory or a lasting storage error, as raised (``restore``).
        """
        moved: list[int] = []
        below = None
        while True:
            newest = max((s for s in self.all_steps() if below is None or s < below), default=-1)
            step = int(share(str(newest))[0])  # process 0's choice
            if step < 0:
                break
            error, seen = None, "ok"
            try:
                state, data = self._read(step, target)
            except CheckpointDamagedError as damage:
                seen = f"damaged: {damage.cause}"
            except Exception as failure:  # raised below, once every process has said
                error, seen = failure, f"failed: {type(failure).__name__}"
            seen_by = share(seen)
            failed = [i for i, text in enumerate(seen_by) if text.startswith("failed")]
            if error is not None:
                raise error
            if failed:
                raise CheckpointError(
                    f"process(es) {failed} could not restore checkpoint "
                    f"{self.directory / str(step)} ({seen_by[failed[0]]}; their logs say why); "
                    "nothing was moved"
                )
            damaged = [(i, text) for i, text in enumerate(seen_by) if text != "ok"]
            if not damaged:
                return step, state, data
            self._move_aside(step, damaged)
            moved.append(step)
            below = step
        if not moved:
            return None
        raise CheckpointError(
            f"no intact checkpoint in {self.directory}: steps {sorted(moved)} were all damaged "
            f"and moved to {self.directory.parent / DAMAGED_DIR}; start a new run or restore "
            "them by hand"
        )

    def _read(self, step: int, target: Any) -> tuple[Any, dict]:
        """One checkpoint onto ``target``, its metadata checked first (``restore``'s errors).
        Reads through the handlers, not Orbax's manager, whose restore ends in a barrier that
        a process whose read failed would never reach."""
        path = self.directory / str(step)
        self._check_matches(path, target)
        item = _restore_args(abstract(target))
        attempt = 0
        while True:
            try:
                state = self._readers["state"].restore(path / "state", args=item)
                data = self._readers["data"].restore(path / "data", args=ocp.args.JsonRestore())
                return state, data
            except Exception as error:
                kind, culprit = _kind(error)
                cause = _first_line(culprit if kind else _root_cause(error))
                if kind == "damage":
                    raise CheckpointDamagedError(path, cause) from error
                if kind == "transient" and attempt + 1 < READ_ATTEMPTS:
                    delay = RETRY_DELAY_S * 2**attempt
                    print(f"jaxstack: reading checkpoint {path} failed ({cause}); retrying in "
                          f"{delay:g}s", file=sys.stderr, flush=True)  # fmt: skip
                    time.sleep(delay)
                    attempt += 1
                    continue
                # out of memory, a lasting transient error or one that proves nothing: as such
                culprit.add_note(f"jaxstack: restoring checkpoint {path}; nothing was moved")
                if culprit is error:
                    raise
                raise culprit from None

    def _check_matches(self, path: epath.Path, target: Any) -> None:
        """Compare the saved tree, shapes and dtypes with ``target``'s, from the metadata alone.

        Raises:
            CheckpointDamagedError: the metadata is missing or unreadable.
            CheckpointMismatchError: they differ.
        """
        try:
            saved = self._readers["state"].metadata(path / "state").tree
        except Exception as error:
            cause = _first_line(_root_cause(error))
            raise CheckpointDamagedError(path, f"unreadable metadata: {cause}") from error
        if saved is None:
            raise CheckpointDamagedError(path, "the state's metadata is missing")
        saved_paths, saved_leaves, _ = leaves_with_paths(saved)
        target_paths, target_leaves, _ = leaves_with_paths(target)
        saved_by_path = dict(zip(saved_paths, saved_leaves, strict=True))
        target_by_path = dict(zip(target_paths, target_leaves, strict=True))
        differences = [
            f"{name}: only in the checkpoint" for name in saved_paths if name not in target_by_path
        ] + [f"{name}: only in this run" for name in target_paths if name not in saved_by_path]
        for name in target_paths:
            if name in saved_by_path:
                was, now = _shape_dtype(saved_by_path[name]), _shape_dtype(target_by_path[name])
                if was != now:
                    differences.append(f"{name}: checkpoint {was}, this run {now}")
        if differences:
            more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
            raise CheckpointMismatchError(
                f"checkpoint {path} does not match this run's model or optimizer: "
                f"{'; '.join(differences[:3])}{more}. It was written by another configuration: "
                "restore with the one that wrote it, train in another work dir, start over here "
                "(jaxstack train --overwrite moves the old run aside), or convert it yourself "
                "(jaxstack.checkpoint.load_params reads its arrays); nothing was moved"
            )

    def _move_aside(self, step: int, damaged: list[tuple[int, str]]) -> epath.Path:
        """Rename a damaged step into ``DAMAGED_DIR`` (process 0, once every process has read
        it) and say so; ``damaged``: (process, what it saw) of the processes that saw damage."""
        source = self.directory / str(step)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        dest = self.directory.parent / DAMAGED_DIR / f"{step}-{stamp}"
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            source.rename(dest)
            process, seen = damaged[0]
            cause = seen.removeprefix("damaged: ")
            where = f"on process {process}: " if jax.process_count() > 1 else ""
            print(
                f"jaxstack: checkpoint {source} is damaged ({where}{cause}); "
                f"moved to {dest}, trying the previous one",
                file=sys.stderr,
                flush=True,
            )
        share("moved")  # nobody lists the steps again before the rename
        self._manager.reload()
        return dest

    def wait(self) -> None:
        """Block until every pending async save is on disk.

        Raises:
            CheckpointError: a pending save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._discard_failed_save()
            raise CheckpointError(_describe(self.directory, error)) from error
        self.check()

    def close(self) -> None:
        """Finish pending saves and release the manager (and the staging buffers)."""
        try:
            self.wait()
        finally:
            self._staging = None
            self._manager.close()
            for reader in self._readers.values():
                reader.close()


def _resolve(directory: epath.Path, steps: list[int], step: int | None) -> int:
    """``step`` if it is one of the saved ``steps`` (ascending), the newest when None.

    Raises:
        FileNotFoundError: no checkpoint at all, or none at ``step``.
    """
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {directory}; train first (jaxstack train) or point to the work "
            "dir of a run that saved one"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {directory}; saved steps: {steps}"
        )
    return step


def _stageable(x: Any) -> bool:
    """Whether ``x`` is a numeric ``jax.Array`` a save copies into staging buffers."""
    return isinstance(x, jax.Array) and (
        jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what it was raised from (or while handling), outermost first."""
    chain = [error]
    while (error.__cause__ or error.__context__) is not None and len(chain) < 50:
        error = error.__cause__ or error.__context__
        chain.append(error)
    return chain


def _root_cause(error: BaseException) -> BaseException:
    return _chain(error)[-1]


_DAMAGE_STATUS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
_TRANSIENT_ERRNO = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR, errno.ESTALE}


def _kind(error: BaseException) -> tuple[str | None, BaseException]:
    """What a failed read proves, and the error in ``error``'s chain (Orbax wraps them) that
    proves it: ``"oom"``, ``"damage"`` (the files are bad), ``"transient"`` (the storage may
    answer next time) or None (nothing: not the checkpoint's fault; then ``error`` itself)."""
    chain = _chain(error)
    for e in chain:
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            return "oom", e
    for e in chain:
        text = str(e).strip("'\" ")  # a KeyError's text comes quoted
        if (
            isinstance(e, (FileNotFoundError, json.JSONDecodeError))
            or (isinstance(e, KeyError) and "was not found in the checkpoint" in text)
            or text.startswith(_DAMAGE_STATUS)
        ):
            return "damage", e
        if (
            isinstance(e, (TimeoutError, ConnectionError))
            or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO)
            or text.startswith(_TRANSIENT_STATUS)
        ):
            return "transient", e
    return None, error


def _shape_dtype(leaf: Any) -> str:
    """``leaf``'s shape and dtype as the mismatch error prints them."""
    return f"{tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name}"


def _from_orbax(error: BaseException | None, *where: Any) -> bool:
    """Whether ``error`` (or a thing in ``where``: a coroutine, a log message) comes from
    Orbax's or TensorStore's asyncio work, or is a closed event loop that work called back."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    names = [repr(w) + getattr(getattr(w, "cr_code", None), "co_filename", "") for w in where]
    for e in _chain(error) if error is not None else []:
        tb: TracebackType | None = e.__traceback__
        while tb is not None:
            names.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
    return any("orbax" in name or "tensorstore" in name for name in names)


def _quiet_orbax(hook: Callable[[Any], Any]) -> Callable[[Any], None]:
    """``hook`` (a ``sys.unraisablehook``) less the reports of abandoned Orbax work (module
    doc), which go to the debug log."""

    def quieted(unraisable: Any) -> None:
        if _from_orbax(unraisable.exc_value, unraisable.object):
            _LOG.debug("abandoned by a failed checkpoint read or write: %r", unraisable.object,
                       exc_info=unraisable.exc_value)  # fmt: skip
        else:
            hook(unraisable)

    quieted.quiets_orbax = True
    return quieted


def _quiet_orbax_noise() -> None:
    """Put the filters of abandoned Orbax work in place (module doc), over whatever hook and
    handlers the program has set by now (the CLI sends library logs to a file)."""
    if not getattr(sys.unraisablehook, "quiets_orbax", False):
        sys.unraisablehook = _quiet_orbax(sys.unraisablehook)
    asyncio_logger = logging.getLogger("asyncio")
    if _quiet_orbax_tasks not in asyncio_logger.filters:
        asyncio_logger.addFilter(_quiet_orbax_tasks)


def _quiet_orbax_tasks(record: logging.LogRecord) -> bool:
    """``asyncio`` log filter: "Task exception was never retrieved", "Task was destroyed but it
    is pending" of Orbax's work go to the debug log (module doc); other records pass."""
    error = record.exc_info[1] if record.exc_info else None
    if not _from_orbax(error, record.getMessage()):
        return True
    _LOG.debug("asyncio: %s", record.getMessage(), exc_info=record.exc_info)
    return False


def _describe(path: epath.Path, error: BaseException) -> str:
    cause = _root_cause(error)
    return f"saving a checkpoint to {path} failed: {type(cause).__name__}: {_first_line(cause)}"


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ``ShapeDtypeStruct`` (sharding kept)."""
    return jax.tree.map(
        lambda x: (
            x
            if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        ),
        tree,
    )


def saved_param_shapes(work_dir: str | os.PathLike, step: int | None = None) -> Any:
    """The params of a run's checkpoint as ``ShapeDtypeStruct`` (no sharding), read from its
    metadata without loading any array."""
    with _Reader(work_dir) as reader:
        tree = reader.manager.item_metadata(reader.step(step))["state"].tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])


class _Reader:
    """Read-only access to a run's checkpoints that can restore part of the state."""

    def __init__(self, work_dir: str | os.PathLike):
        self.directory = work_path(work_dir) / "checkpoints"
        if not self.directory.exists():
            raise FileNotFoundError(
                f"no checkpoints directory at {self.directory}; pass the work dir of a training run"
            )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(create=False, save_interval_steps=0),
            item_handlers=_handlers(),
        )

    def step(self, step: int | None) -> int:
        """``step`` if saved, the newest when None (``FileNotFoundError`` otherwise)."""
        return _resolve(self.directory, sorted(self.manager.all_steps()), step)

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.manager.close()


def load_params(
    work_dir: str | os.PathLike,
    target: Any | None = None,
    step: int | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    param_specs: Any = None,
) -> Any:
    """Load only the parameters of a run's checkpoint (for inference): one call.

    Where they land, first match wins:

    - ``target``: a params pytree of arrays or ``ShapeDtypeStruct`` with shardings;
    - ``mesh`` and ``param_specs`` (a pytree of ``PartitionSpec`` like the params, e.g.
      from ``Predictor.param_specs``): straight into that sharded placement, never whole
      on one device;
    - neither: the first device.

    Raises:
        FileNotFoundError: no checkpoint (at ``step``) in ``work_dir``.
    """
    if (mesh is None) != (param_specs is None):
        raise ValueError("load_params needs both mesh= and param_specs=, or neither")
    if target is None:
        shapes = saved_param_shapes(work_dir, step)
        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            placed = jax.tree.map(lambda _: device, shapes)
        else:
            placed = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), param_specs)
        target = jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            shapes,
            placed,
        )
    item = {"params": abstract(target)}
    with _Reader(work_dir) as reader:
        restored = reader.manager.restore(
            reader.step(step),
            args=ocp.args.Composite(state=_restore_args(item, partial_restore=True)),
        )
    return restored["state"]["params"]

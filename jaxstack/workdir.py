"""Where a run lives, one writer per work dir, and where a run's full tracebacks go.

A work dir is a local path, a ``file://`` URL (the same, spelled as a URL) or a remote URL
such as ``gs://bucket/runs/x`` that every host of a pod reaches (``work_path``). Remote
URLs stay URLs, handled through ``etils.epath`` (and by Orbax and tensorstore for the
checkpoints); they are never turned into a local path, which on a pod would give every host
its own private copy.

``WorkDirLock`` holds ``<work_dir>/.lock`` with an exclusive ``flock`` for as long as a
trainer trains there, and writes its host, pid and start time into the file. The kernel
releases the lock when the process dies however it dies, so a lock file left by a killed
run is stale by construction and the next run takes it over; a live holder makes a second
trainer refuse with an error naming it. Object stores have no such lock: on a remote work
dir the lock is not taken, and the trainer says so. Neither has a file system mounted without
``flock`` (Lustre without ``-o flock``, NFS without a lock daemon): there the run proceeds with
a one-line warning, as on an object store.

With several processes, process 0 alone takes the lock (one file on a shared file system) and
tells the others (``distributed.share``): the lock is taken, refused or failed on every host
together, each raising the same error.
"""

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys
import traceback
from pathlib import Path

import jax
from etils import epath

from jaxstack.distributed import share

LOCK_FILE = ".lock"
ERROR_LOG = "error.log"
_URL = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://")
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}
"""``flock`` errors of a file system that has no locks."""


class WorkDirUnreachableError(ValueError):
    """A remote work dir whose filesystem cannot be reached from this machine."""


def work_path(work_dir: str | os.PathLike) -> epath.Path:
    """``work_dir`` as a path every part of a run uses: a local path (absolute) for local
    paths and ``file://`` URLs, the URL itself for remote ones (``gs://...``).

    Raises:
        WorkDirUnreachableError: the URL's filesystem cannot be reached (e.g. ``gs://``
            without ``gcsfs`` installed), naming what to install or use instead.
    """
    text = os.fspath(work_dir)
    match = _URL.match(text)
    if match is None:
        return epath.Path(Path(text).absolute())
    if match["scheme"] == "file":
        return epath.Path(Path(text[len("file://") :]).absolute())
    path = epath.Path(text)
    try:
        path.exists()
    except Exception as error:  # each backend has its own errors (ImportError, auth, ...)
        raise WorkDirUnreachableError(
            f"work dir {text} cannot be reached from this machine: {error}. For gs:// install "
            "gcsfs (pip install gcsfs) and give this machine credentials that can write the "
            "bucket, or use a path on a filesystem every host mounts"
        ) from None
    return path


def is_local(path: epath.Path) -> bool:
    """Whether ``path`` (from ``work_path``) is on this machine's filesystem."""
    return _URL.match(os.fspath(path)) is None


class WorkDirLockError(RuntimeError):
    """The work dir's lock could not be taken (the lock file cannot be created or locked)."""


class WorkDirBusyError(WorkDirLockError):
    """Another live process is training in this work dir."""


class WorkDirLock:
    """Exclusive use of a work dir by this job (see the module doc)."""

    def __init__(self, work_dir: str | os.PathLike):
        self.work_dir = work_path(work_dir)
        self.path = Path(self.work_dir / LOCK_FILE) if is_local(self.work_dir) else None
        self._file = None

    def acquire(self) -> None:
        """Take the lock on every process together (module doc); say so in one line where
        there is no lock to take (a remote work dir, a file system without ``flock``).

        Raises:
            WorkDirBusyError: a live process holds it (named), on every process.
            WorkDirLockError: the lock file cannot be created or locked, on every process.
        """
        failure, said = None, ""
        if jax.process_index() == 0:
            try:
                self._take()
            except Exception as error:  # the others are told before it is raised
                failure, said = error, f"{type(error).__name__}\n{error}"
        kind, _, message = share(said)[0].partition("\n")
        if failure is not None:
            raise failure
        if kind:
            error_class = WorkDirBusyError if kind == "WorkDirBusyError" else WorkDirLockError
            raise error_class(f"process 0: {message}")

    def _take(self) -> None:
        """This process takes the lock (``acquire``'s errors)."""
        if self._file is not None:
            return
        if self.path is None:
            _warn(f"{self.work_dir} is remote: no lock keeps a second trainer out of it; make "
                  "sure only one run uses it")  # fmt: skip
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
        except OSError as error:
            raise WorkDirLockError(
                f"cannot create the lock file {self.path} ({error.strerror}); check that the "
                "work dir can be written, or train in another one"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise WorkDirBusyError(
                f"work dir {self.path.parent} is in use by {holder}; wait for that run to "
                "finish, stop it, or train in another work dir"
            ) from None
        except OSError as error:
            handle.close()
            if error.errno not in _NO_FLOCK:
                raise WorkDirLockError(
                    f"cannot lock {self.path} ({error.strerror}); train in another work dir"
                ) from None
            _warn(f"{self.path.parent}'s file system has no flock ({error.strerror}): no lock "
                  "keeps a second trainer out of it; make sure only one run uses it")  # fmt: skip
            return
        handle.seek(0)
        handle.truncate()
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        handle.write(json.dumps(holder))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Give the lock back (the file stays; its content is history)."""
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _warn(message: str) -> None:
    print(f"jaxstack: {message}", file=sys.stderr, flush=True)


def append_text(path: epath.Path, text: str) -> None:
    """Append ``text`` to ``path``: in place on a local filesystem; object stores cannot
    append, so there the file is read and written whole (fine for logs of this size)."""
    if is_local(path):
        with open(os.fspath(path), "a") as f:
            f.write(text)
    else:
        path.write_text((path.read_text() if path.exists() else "") + text)


def log_traceback(work_dir: str | os.PathLike, error: BaseException) -> epath.Path | None:
    """Append ``error``'s full traceback to ``<work_dir>/error.log``; the path, or None when
    the work dir cannot be written either."""
    try:
        path = work_path(work_dir) / ERROR_LOG
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        append_text(path, f"--- {stamp}\n" + "".join(traceback.format_exception(error)))
    except (OSError, WorkDirUnreachableError):
        return None
    return path

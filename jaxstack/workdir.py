"""One writer per work dir, and where a run's full tracebacks go.

``WorkDirLock`` holds ``<work_dir>/.lock`` with an exclusive ``flock`` for as long as a
trainer trains there, and writes its host, pid and start time into the file. The kernel
releases the lock when the process dies however it dies, so a lock file left by a killed
run is stale by construction and the next run takes it over; a live holder makes a second
trainer refuse with an error naming it.
"""

import datetime
import fcntl
import json
import os
import socket
import traceback
from pathlib import Path

LOCK_FILE = ".lock"
ERROR_LOG = "error.log"


class WorkDirBusyError(RuntimeError):
    """Another live process is training in this work dir."""


class WorkDirLock:
    """Exclusive use of a work dir by this process (see the module doc)."""

    def __init__(self, work_dir: str | Path):
        self.path = Path(work_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        """Take the lock, or raise ``WorkDirBusyError`` naming the holder."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open while the lock is held
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


def log_traceback(work_dir: str | Path, error: BaseException) -> Path | None:
    """Append ``error``'s full traceback to ``<work_dir>/error.log``; the path, or None when
    the work dir cannot be written either."""
    path = Path(work_dir) / ERROR_LOG
    try:
        with open(path, "a") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}\n")
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return path

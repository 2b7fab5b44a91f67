"""Preemption: SIGTERM / SIGINT end a run at a step boundary with a saved checkpoint.

Single process: the first signal sets a flag the training loop reads between steps (no
device sync); the loop then saves synchronously, still inside the guard, and returns. From
the signal on, a watchdog exits the process (status ``128 + signal``, saying so) if finishing
the step and the save takes longer than the grace period, and a second signal exits at once
(the same status): neither waits for a save that hangs.

Several processes: JAX's preemption service (``jax.distributed``) receives SIGTERM on any
host and agrees on one step at which every process stops
(``multihost_utils.reached_preemption_sync_point``), so all save the same step. Python
signal handlers would replace the service's, so none are installed there.
"""

import os
import signal
import sys
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Context manager: ``guard.should_stop(step)`` is True once the run must stop and save."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None
        self._multihost = jax.process_count() > 1

    def __enter__(self) -> "PreemptionGuard":
        if not self._multihost and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            print(f"jaxstack: second {name}: exiting now, without a save", file=sys.stderr)
            os._exit(128 + signum)
        self.signal_name = name
        print(
            f"jaxstack: {name} received: finishing this step, then saving a checkpoint "
            f"(at most {self.grace_s:g}s)",
            file=sys.stderr,
            flush=True,
        )
        self._watchdog = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _give_up(self, signum: int) -> None:
        print(
            f"jaxstack: the save after {self.signal_name} did not finish within "
            f"{self.grace_s:g}s (preemption_grace_s); exiting without it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def should_stop(self, step: int) -> bool:
        """Whether the run must stop after ``step`` (every process gets the same answer)."""
        if self._multihost:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = self.signal_name or "preemption notice"
                return True
            return False
        return self.signal_name is not None

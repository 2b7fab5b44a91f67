"""Training metrics: a JSONL file in the work dir, the console log, and throughput.

The console shows a live progress bar where it can redraw one (a terminal, a notebook);
anywhere else (stdout to a file or a pipe: SLURM and TPU pod job logs) every logged step is
one plain line, flushed at once, e.g.::

    train step 200/1000  loss=2.314  eval_loss=2.402  lr=0.0003  grad_norm=0.4121
    tokens/s=1.05e+04  mfu=41.2%  elapsed=0:03:20  eta=0:13:20

(one line in the log). Long one-off steps of other commands (loading weights, compiling
serving buckets) print start / done lines the same way (:func:`long_step`).
"""

import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

import jax
import numpy as np
import rich
from etils import epath
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    track,
)

from jaxstack.workdir import append_text, work_path

T = TypeVar("T")


def console_is_live() -> bool:
    """Whether stdout redraws in place (a terminal or a notebook), where progress bars go;
    a file or a pipe gets plain lines instead."""
    if rich.get_console().is_jupyter:
        return True
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return False


def say(message: str) -> None:
    """One plain line on stdout from process 0, flushed at once (a job log shows it now)."""
    if jax.process_index() == 0:
        print(f"jaxstack: {message}", flush=True)


@contextlib.contextmanager
def long_step(what: str, show: bool = True) -> Iterator[None]:
    """Say that ``what`` starts, and when it is done, how long it took (``say``).

    Example: ``with long_step("loading weights from DIR"): ...`` prints
    ``jaxstack: loading weights from DIR ...`` then ``jaxstack: loading weights from DIR:
    done in 2.4s``.
    """
    if show:
        say(f"{what} ...")
    start = time.perf_counter()
    yield
    if show:
        say(f"{what}: done in {time.perf_counter() - start:.1f}s")


def tracked(items: Sequence[T], what: str, show: bool = True) -> Iterator[T]:
    """``items``, with a progress bar on a live console, or start / done lines
    (``long_step``) in a log; nothing when not ``show``."""
    if show and console_is_live():
        yield from track(items, description=what)
        return
    with long_step(f"{what} ({len(items)})", show):
        yield from items


class MetricsLogger:
    """Writes one JSON object per logged step to ``<work_dir>/metrics.jsonl`` (process 0 only)
    and shows the run on the console: a progress bar with the latest metrics where the
    console redraws (``console_is_live``) and ``show`` is set; otherwise one plain line per
    logged step (module doc), flushed at once.

    A run resumed at ``start_step`` first drops the records of later steps (logged before an
    interruption and about to be redone), so every step appears once in the file.
    """

    def __init__(
        self, work_dir: str | os.PathLike, total_steps: int, start_step: int, show: bool = True
    ):
        self.is_main = jax.process_index() == 0
        self.path = work_path(work_dir) / "metrics.jsonl"
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_records_after(self.path, start_step)
        bar = show and console_is_live()
        self._lines = self.is_main and not bar
        self.total_steps = total_steps
        self._start = time.perf_counter()
        self._last = (start_step, self._start)  # (step, time) of the last line: the ETA's rate
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            disable=not (bar and self.is_main),
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start_step, status=""
        )
        self._progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for ``step``; refresh the progress bar or print the step's line."""
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.is_main:
            append_text(self.path, json.dumps(record) + "\n")
        status = _status(record)
        self._progress.update(self._task, completed=step, status="  ".join(status))
        if self._lines:
            now = time.perf_counter()
            last_step, last_time = self._last
            self._last = (step, now)
            parts = [f"train step {step}/{self.total_steps}", *status]
            parts.append(f"elapsed={_duration(now - self._start)}")
            if step > last_step and now > last_time:
                rate = (step - last_step) / (now - last_time)
                parts.append(f"eta={_duration((self.total_steps - step) / rate)}")
            print("  ".join(parts), flush=True)

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` without logging."""
        self._progress.update(self._task, completed=step)

    def close(self) -> None:
        """Stop the progress bar."""
        self._progress.stop()


def host_value(value) -> float | list:
    """A metric as JSON: a scalar as float, a vector (per-expert load, say) as a list."""
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else array.astype(float).tolist()


def _plain(value) -> float | int | str | list:
    if isinstance(value, int | str | list):
        return value
    return host_value(value)


def _fmt(value) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (value and abs(value) < 1e-3)):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_SHOWN = {"loss": "loss", "eval_loss": "eval_loss", "lr": "lr", "grad_norm": "grad_norm",
          "tokens_per_sec": "tokens/s", "examples_per_sec": "examples/s"}  # fmt: skip
"""Metrics shown on the console (key: label), in this order, then ``mfu`` in percent."""


def _status(record: dict) -> list[str]:
    parts = [
        f"{label}={_fmt(record[key])}"
        for key, label in _SHOWN.items()
        if isinstance(record.get(key), float | int)
    ]
    if isinstance(record.get("mfu"), float):
        parts.append(f"mfu={100 * record['mfu']:.1f}%")
    return parts


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def _drop_records_after(path: epath.Path, step: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


class Throughput:
    """Tokens (or examples) per second of training steps alone.

    The caller ``pause``-s the clock once a step's results are on the host (so the time
    covers the device work), around evaluation and saves, and ``reset``-s it after logging
    and after the compiling first step. The unit is tokens when batches hold ``input_ids``
    (its elements, padding included: what the model computed), else examples; the rate is
    named after it (``tokens_per_sec`` / ``examples_per_sec``). With ``flops_per_token`` and
    a ``peak`` (``jaxstack.perf.Peak``) token rates come with ``mfu``.
    """

    def __init__(self, flops_per_token: float | None = None, peak=None):
        self.flops_per_token, self.peak = flops_per_token, peak
        if peak is not None and jax.process_index() == 0:
            print(f"jaxstack: MFU against {peak.source} = {peak.flops / 1e12:.3g} TFLOP/s",
                  file=sys.stderr)  # fmt: skip
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.count, self.seconds, self._since = 0, 0.0, time.perf_counter()

    def add(self, batch: dict) -> None:
        """Count one host-local batch (all processes hold equal shares)."""
        if "input_ids" in batch:
            self.unit, local = "tokens", np.size(batch["input_ids"])
        else:
            self.unit, local = "examples", np.shape(next(iter(batch.values())))[0]
        self.count += int(local) * jax.process_count()

    def pause(self) -> None:
        """Stop the clock (the last step's results have reached the host)."""
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        """Restart the clock after work that is not training."""
        if self._since is None:
            self._since = time.perf_counter()

    def rates(self) -> dict[str, float]:
        """``{unit}_per_sec`` (and ``mfu``) of the window; empty when it timed nothing."""
        self.pause()
        if not self.count or self.seconds <= 0:
            return {}
        rate = self.count / self.seconds
        out = {f"{self.unit}_per_sec": rate}
        if self.unit == "tokens" and self.flops_per_token and self.peak is not None:
            out["mfu"] = rate * self.flops_per_token / self.peak.flops
        return out

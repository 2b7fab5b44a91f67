"""Training metrics: a JSONL file in the work dir, a live progress bar, and throughput."""

import json
import math
import os
import sys
import time

import jax
import numpy as np
from etils import epath
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxstack.workdir import append_text, work_path


class MetricsLogger:
    """Writes one JSON object per logged step to ``<work_dir>/metrics.jsonl`` (process 0 only)
    and shows a progress bar with the latest loss.

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
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            disable=not (show and self.is_main),
        )
        self._task = self._progress.add_task(
            "train", total=total_steps, completed=start_step, status=""
        )
        self._progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for ``step`` and refresh the progress bar."""
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.is_main:
            append_text(self.path, json.dumps(record) + "\n")
        shown = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_sec", "examples_per_sec",
                 "mfu")  # fmt: skip
        status = "  ".join(f"{k}={_fmt(record[k])}" for k in shown if k in record)
        self._progress.update(self._task, completed=step, status=status)

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

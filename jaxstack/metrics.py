"""Training metrics: a JSONL file in the work dir and a live progress bar on the console."""

import json
import math
from pathlib import Path

import jax
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLogger:
    """Writes one JSON object per logged step to ``<work_dir>/metrics.jsonl`` (process 0 only)
    and shows a progress bar with the latest loss."""

    def __init__(self, work_dir: str | Path, total_steps: int, start_step: int, show: bool = True):
        self.is_main = jax.process_index() == 0
        self.path = Path(work_dir) / "metrics.jsonl"
        self._file = open(self.path, "a") if self.is_main else None  # noqa: SIM115
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
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        shown = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_sec", "mfu")
        status = "  ".join(f"{k}={_fmt(record[k])}" for k in shown if k in record)
        self._progress.update(self._task, completed=step, status=status)

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` without logging."""
        self._progress.update(self._task, completed=step)

    def close(self) -> None:
        """Stop the progress bar and close the file."""
        self._progress.stop()
        if self._file:
            self._file.close()


def _plain(value) -> float | int | str:
    if isinstance(value, int | str):
        return value
    return float(value)


def _fmt(value) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (value and abs(value) < 1e-3)):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)

"""The console side of metrics: plain, complete, flushed lines where no bar can redraw."""

import contextlib
import os

import pytest

from jaxstack import metrics, xla_flags


@contextlib.contextmanager
def _pipe_stdout():
    """stdout as a block-buffered pipe; yields a function reading what reached the pipe."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with open(write_end, "w", buffering=1 << 16) as pipe, contextlib.redirect_stdout(pipe):

        def reached() -> str:
            try:
                return os.read(read_end, 1 << 16).decode()
            except BlockingIOError:
                return ""

        yield reached
    os.close(read_end)


@pytest.mark.parametrize("live", [False, True])
def test_lines_unless_a_live_console_shows_the_bar(tmp_path, monkeypatch, live):
    """A pipe gets a line per logged step at once, whatever ``show`` says; a live console
    (a terminal) gets them only with the bar turned off (``progress_bar=False``)."""
    monkeypatch.setattr(metrics, "console_is_live", lambda: live)
    record = {"loss": 2.5, "eval_loss": 2.75, "lr": 3e-4, "tokens_per_sec": 1234.5, "mfu": 0.25}
    for show in (True, False):
        with _pipe_stdout() as reached:
            logger = metrics.MetricsLogger(tmp_path / str(show), 10, 0, show=show)
            logger.log(5, record)
            line = reached()
            logger.close()
        if live and show:
            assert "train step" not in line
            continue
        assert line.startswith("train step 5/10  loss=2.5  eval_loss=2.75  lr=0.0003  ")
        assert "tokens/s=1234  mfu=25.0%  elapsed=0:00:00  eta=0:00:00" in line
        assert line.endswith("\n") and line.count("\n") == 1


def test_long_steps_say_start_and_done_in_a_log(monkeypatch):
    monkeypatch.setattr(metrics, "console_is_live", lambda: False)
    with _pipe_stdout() as reached:
        seen = list(metrics.tracked([1, 2, 3], "compiling buckets"))
        lines = reached().splitlines()
    assert seen == [1, 2, 3]
    assert lines[0] == "jaxstack: compiling buckets (3) ..."
    assert lines[1].startswith("jaxstack: compiling buckets (3): done in ")
    with _pipe_stdout() as reached:
        assert list(metrics.tracked([1], "quiet", show=False)) == [1]
        assert reached() == ""


def test_no_flag_line_where_no_flag_was_set(monkeypatch):
    monkeypatch.setattr(xla_flags.xla_bridge, "backends_are_initialized", lambda: False)
    assert xla_flags.apply_xla_flags("cpu", {}).describe() is None
    env = {"XLA_FLAGS": " ".join(xla_flags.BUNDLES["gpu"])}  # the user set them all
    assert xla_flags.apply_xla_flags("gpu", env).describe() is None
    assert xla_flags.apply_xla_flags("gpu", {"JAXSTACK_XLA_FLAGS": "off"}).describe() is None
    assert xla_flags.apply_xla_flags("tpu", {}).describe().startswith("xla flags (tpu, ")

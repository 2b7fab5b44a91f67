"""Constants and helpers the serving tests share (a module of its own, not ``conftest``,
so that ``from serve_helpers import ...`` finds it however pytest was started)."""

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from jaxstack.data import ByteTokenizer
from jaxstack.serve import SamplingParams

EOS = ByteTokenizer.eos_id
ENGINE_OPTIONS = dict(
    page_size=4,
    num_pages=48,  # 192 token slots: eight running requests overflow it (preemption)
    max_model_len=128,
    token_buckets=(8, 32),  # prompts over 32 tokens are prefilled in chunks
    seq_buckets=(8,),
    max_queue=96,
)


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on a free port of 127.0.0.1 (in a thread); yields
    its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until_idle(engine, timeout: float = 30.0) -> None:
    """Wait until no request runs or waits and every KV page is free."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.running or engine.scheduler.waiting or engine.cache.num_used:
        assert time.monotonic() < deadline, f"{engine.cache.num_used} pages still in use"
        time.sleep(0.02)


def cancelled(engine) -> float:
    """Requests the engine finished as cancelled so far."""
    labels = {"reason": "cancelled"}
    value = engine.metrics.registry.get_sample_value("jaxstack_requests_finished_total", labels)
    return value or 0.0


class EngineHold:
    """Holds the engine thread inside a request's first output callback until ``release``:
    running requests make no progress meanwhile (a stand-in for a busy engine)."""

    def __init__(self, engine):
        self.entered, self._release = threading.Event(), threading.Event()
        engine.submit([1], SamplingParams(max_tokens=2, ignore_eos=True), self._hold)

    def _hold(self, out) -> None:
        if not out.finished:
            self.entered.set()
            self._release.wait(timeout=60)

    def release(self) -> None:
        self._release.set()

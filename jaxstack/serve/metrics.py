"""Prometheus metrics of one engine (its own registry, so several engines can coexist).

``prometheus_client`` comes with the ``serve`` extra; without it the engine runs (``js.LLM``)
and only ``tokens_per_second`` is kept.
"""

import threading
import time
from collections import deque
from collections.abc import Callable

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:  # the serve extra is not installed
    CollectorRegistry = None

SERVE_EXTRA = 'pip install "jaxstack[serve]"'
"""How to install the HTTP server's packages (fastapi, uvicorn, prometheus_client)."""

PHASES = ("schedule", "pack", "dispatch", "device", "output")
"""The engine thread's phases, timed by ``jaxstack_engine_phase_seconds_total{phase}``."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineMetrics:
    """Queue depth, running requests, KV pages used, tokens/s, TTFT and TPOT histograms, and
    the engine thread's seconds per phase.

    The gauges read the engine when scraped (``gauges`` gives the three functions); the
    engine thread reports tokens and latencies as they happen.
    """

    def __init__(self, gauges: dict[str, Callable[[], float]], window_s: float = 10.0):
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # the engine appends, a scrape reads
        if CollectorRegistry is None:
            self.registry = None
            self.tokens = self.requests = self.ttft = self.tpot = _Unrecorded()
            self.step_failures = self.phase_seconds = _Unrecorded()
            return
        self.registry = CollectorRegistry()
        describe = {
            "queue_depth": "Requests waiting to start (or to resume after preemption)",
            "running_requests": "Requests holding KV cache pages",
            "kv_pages_used": "KV cache pages referenced by a request",
        }
        for name, text in describe.items():
            Gauge(f"jaxstack_{name}", text, registry=self.registry).set_function(gauges[name])
        self.tokens = Counter(
            "jaxstack_generation_tokens", "Output tokens produced", registry=self.registry
        )
        self.requests = Counter(
            "jaxstack_requests_finished",
            "Requests finished, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.step_failures = Counter(
            "jaxstack_step_failures",
            "Device steps that failed (each rebuilt the KV cache)",
            registry=self.registry,
        )
        self.phase_seconds = Counter(
            "jaxstack_engine_phase_seconds",
            "Wall seconds the engine thread spent per phase: schedule, pack, dispatch "
            "(launching a step), device (waiting for its tokens), output (detokenization, stop "
            "strings, callbacks)",
            ["phase"],
            registry=self.registry,
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        self.ttft = Histogram(
            "jaxstack_time_to_first_token_seconds",
            "From arrival to the first output token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "jaxstack_time_per_output_token_seconds",
            "Mean gap between a request's output tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        Gauge(
            "jaxstack_generation_tokens_per_second",
            f"Output tokens per second over the last {window_s:g} s",
            registry=self.registry,
        ).set_function(self.tokens_per_second)

    def on_tokens(self, n: int) -> None:
        """``n`` output tokens were produced now."""
        self.tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic(), n))

    def tokens_per_second(self) -> float:
        """Output tokens per second over the recent window."""
        cutoff = time.monotonic() - self._window_s
        with self._lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window_s

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric.

        Raises:
            ModuleNotFoundError: ``prometheus_client`` (the ``serve`` extra) is not installed.
        """
        if self.registry is None:
            raise ModuleNotFoundError(f"Prometheus metrics need the serve extra: {SERVE_EXTRA}")
        return generate_latest(self.registry)


class _Unrecorded:
    """Stands in for the Prometheus counters and histograms without ``prometheus_client``."""

    def labels(self, *values: str) -> "_Unrecorded":
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

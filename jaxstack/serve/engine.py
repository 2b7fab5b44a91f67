"""The serving engine: a request queue, one engine thread that schedules and runs steps, and
per-request outputs streamed through callbacks.

Callers on any thread ``submit`` (validated there: a bad request raises at once and never
reaches the engine thread) and ``cancel``; the engine thread owns the scheduler, the KV cache
and the model, runs ``schedule -> pack -> run -> sample`` until idle, and reports every
new token. A failure while serving a request ends that request with ``finish_reason
"error"``; the thread itself keeps running.

A failed device step (out of memory, an XLA error) heals: the step donated the KV pages, so
they are rebuilt empty, the prefix cache is forgotten, and every running request goes back to
the queue to recompute its prompt and the tokens it already produced (greedy and seeded
outputs continue unchanged). A request caught in more than ``EngineConfig.step_retries``
failed steps ends with ``finish_reason "error"`` naming the failure, so a request that breaks
every step cannot stall the engine. ``healthy`` is False from the failure until the rebuilt
pages have run an empty probe step; while the probe fails it is retried every
``RECOVERY_RETRY_S`` seconds and nothing else runs.
"""

import itertools
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import jax
import numpy as np
from jax.sharding import Mesh

from jaxstack.data.tokenizers import Tokenizer
from jaxstack.models.llama import Llama
from jaxstack.serve.kv_cache import KVCacheManager
from jaxstack.serve.metrics import PHASES, EngineMetrics
from jaxstack.serve.output import OutputProcessor, RequestOutput
from jaxstack.serve.runner import (
    ModelRunner,
    StepOutputs,
    kv_budget_bytes,
    page_bytes,
    weight_bytes,
)
from jaxstack.serve.sampling import BIAS_SLOTS, SamplingParams, TokenLogprob
from jaxstack.serve.scheduler import RequestState, Scheduler
from jaxstack.serve.structured import Grammars

log = logging.getLogger("jaxstack.serve")
MIB = 2**20
RECOVERY_RETRY_S = 1.0
"""Seconds between attempts to rebuild the KV pages while the device keeps failing."""


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the KV cache and of the compiled step shapes."""

    page_size: int = 16
    """Token slots per KV page."""
    num_pages: int | None = None
    """KV pages per layer (cache memory: layers x pages x page_size x 2 x kv_heads x head_dim);
    default: what ``memory_fraction`` leaves, up to every sequence of the largest sequence
    bucket at ``max_model_len``."""
    memory_fraction: float = 0.9
    """Share of each device's memory the weights and the KV cache may take (vLLM's
    ``gpu_memory_utilization``); on CPU, of the available host memory. Unused with
    ``num_pages``."""
    max_model_len: int | None = None
    """Longest prompt + output; default the model's ``max_seq_len``."""
    token_buckets: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128, 256)
    """Tokens per step the step is compiled for; the largest is the per-step token budget
    (prefill chunks fill what decodes leave). A step's matmuls cost its bucket's tokens, so
    the small ones keep a lone decode at one row of work (docs/serving.md, "Step shapes")."""
    seq_buckets: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
    """Sequences per step compiled for; the largest is the most requests running at once.
    Every (tokens, sequences) pair with sequences <= tokens is compiled at start (33 with
    the defaults)."""
    max_queue: int = 1024
    """Requests waiting to start before ``submit`` raises ``QueueFullError``."""
    prefix_caching: bool = True
    """Share full KV pages between requests with the same token prefix."""
    async_scheduling: bool = True
    """Schedule and pack the next step while the current one runs, its sampled tokens
    feeding the next step on the device (a request that stops wastes one token of compute);
    outputs are the same either way."""
    step_retries: int = 1
    """Times a request caught in a failed device step is recomputed before it ends with
    ``finish_reason "error"`` (0: it ends at the first failure)."""

    def __post_init__(self) -> None:
        for name in ("token_buckets", "seq_buckets"):
            sizes = tuple(getattr(self, name))
            if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
                raise ValueError(f"{name}={sizes!r} must be a non-empty tuple of ints >= 1")
            object.__setattr__(self, name, tuple(sorted(sizes)))
        if self.seq_buckets[-1] > self.token_buckets[-1]:
            raise ValueError(
                f"the largest seq bucket {self.seq_buckets[-1]} exceeds the token budget "
                f"{self.token_buckets[-1]} (each running request needs a token per step)"
            )
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction={self.memory_fraction} must be in (0, 1]")
        for name in ("page_size", "num_pages", "max_queue"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.step_retries < 0:
            raise ValueError(f"step_retries={self.step_retries} must be >= 0")

    @classmethod
    def field_names(cls) -> set[str]:
        """Names of the config fields."""
        return {f.name for f in fields(cls)}


def _token_logprob(outputs: StepOutputs, row: int, k: int) -> TokenLogprob:
    """Row ``row``'s sampled token and log-probabilities, with its ``k`` most likely tokens."""
    chosen, top_ids, top = outputs.logprobs
    pairs = zip(top_ids[row, :k].tolist(), top[row, :k].tolist(), strict=True)
    return TokenLogprob(int(outputs.tokens[row]), float(chosen[row]), tuple(pairs))


def _needs_host_tokens(seq: RequestState) -> bool:
    """Whether packing ``seq``'s next step needs its last token on the host: its grammar's
    mask follows that token, and penalties count every token."""
    if seq.num_resolved == seq.num_tokens:
        return False
    p = seq.params
    rates = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
    return seq.matcher is not None or rates != (1.0, 0.0, 0.0)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


@dataclass(eq=False)
class _Request:
    seq: RequestState
    on_output: Callable[[RequestOutput], None]
    arrival_time: float
    processor: OutputProcessor
    first_token_time: float | None = None
    failed_steps: int = 0


@dataclass
class _InFlight:
    """A dispatched step whose sampled tokens the host has not read yet."""

    step: list[tuple[RequestState, int]]
    sampled: tuple  # the step's (tokens, logprobs) on the device (runner.dispatch)
    rows: list[tuple[int, RequestState, int]]  # (row, sequence, index of its new token)
    logprobs: bool  # whether a row asked for log-probabilities


class Engine:
    """Continuous-batching inference over a paged KV cache (see the module docstring).

    ``tokenizer`` is needed for text outputs and stop strings; ``eos_id`` (one id or several,
    e.g. a chat model's end-of-text and end-of-turn) ends a request (default: the tokenizer's
    EOS). ``mesh``: tensor-parallel serving (params placed by
    ``sharding_rules``, KV heads over ``tensor``). Compiles every bucket at construction
    (``progress`` shows a bar), then starts the engine thread.
    """

    def __init__(
        self,
        model: Llama,
        params,
        config: EngineConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        eos_id: int | Sequence[int] | None = None,
        mesh: Mesh | None = None,
        progress: bool = True,
    ):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        if eos_id is None:
            eos_id = getattr(tokenizer, "eos_id", None)
        eos = () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else eos_id
        self.eos_ids: frozenset[int] = frozenset(int(i) for i in eos)
        """Token ids that end a request (unless it ``ignore_eos``)."""
        self.max_model_len = config.max_model_len or model.config.max_seq_len
        variables = params.get("params", params)
        self._grammars = Grammars(tokenizer, model.config.vocab_size, self.eos_ids)
        self.num_pages = config.num_pages or self._pages_from_memory(mesh)
        """KV pages per layer (``EngineConfig.num_pages``, or sized from memory)."""
        self.cache = KVCacheManager(self.num_pages, config.page_size, config.prefix_caching)
        self.scheduler = Scheduler(
            self.cache,
            max_num_tokens=config.token_buckets[-1],
            max_num_seqs=config.seq_buckets[-1],
        )
        self.runner = ModelRunner(
            model,
            variables,
            num_pages=self.num_pages,
            page_size=config.page_size,
            pages_per_seq=math.ceil(self.max_model_len / config.page_size),
            token_buckets=config.token_buckets,
            seq_buckets=config.seq_buckets,
            mesh=mesh,
            eos_ids=self.eos_ids,
        )
        self.plan = self._plan(variables, mesh)
        """One line: weights, KV cache bytes and capacity in tokens, per device."""
        log.info(self.plan)
        if progress:
            print(self.plan, flush=True)
        self.runner.warmup(progress)
        self.metrics = EngineMetrics(
            {
                "queue_depth": lambda: self.num_waiting,
                "running_requests": lambda: len(self.scheduler.running),
                "kv_pages_used": lambda: self.cache.num_used,
            }
        )
        self._phase_seconds = dict.fromkeys(PHASES, 0.0)
        self._inflight: _InFlight | None = None
        self._scheduled: list[tuple[RequestState, int]] = []  # scheduled by the current iteration
        self._inbox: queue.Queue = queue.Queue()
        self._requests: dict[str, _Request] = {}  # engine thread only
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._live: set[str] = set()  # ids of unfinished requests
        self._stopping = False
        self._healthy = True  # False from a failed step until the rebuilt pages ran a probe
        self._next_recovery = 0.0  # monotonic time of the next rebuild attempt
        self._thread = threading.Thread(target=self._loop, name="jaxstack-engine", daemon=True)
        self._thread.start()

    def _pages_from_memory(self, mesh: Mesh | None) -> int:
        """KV pages per layer that ``memory_fraction`` of each device leaves after the
        weights, at most enough for every sequence at ``max_model_len``."""
        config = self.config
        devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
        budget = kv_budget_bytes(devices, config.memory_fraction)
        per_page = page_bytes(self.model.config, config.page_size, mesh)
        per_seq = math.ceil(self.max_model_len / config.page_size)
        pages = min(max(budget, 0) // per_page, per_seq * config.seq_buckets[-1])
        if pages < per_seq:
            raise ValueError(
                f"memory_fraction={config.memory_fraction} leaves {max(budget, 0) / MIB:.1f} MiB "
                f"per device for the KV cache, less than the {per_seq * per_page / MIB:.1f} MiB "
                f"one sequence of max_model_len={self.max_model_len} tokens needs; raise "
                "memory_fraction, lower max_model_len, or set num_pages"
            )
        return int(pages)

    def _plan(self, params, mesh: Mesh | None) -> str:
        devices = 1 if mesh is None else mesh.devices.size
        kv = self.num_pages * page_bytes(self.model.config, self.config.page_size, mesh)
        return (
            f"serving plan per device ({devices} device{'s' if devices > 1 else ''}): weights "
            f"{weight_bytes(params) / MIB:.1f} MiB, KV cache {kv / MIB:.1f} MiB = "
            f"{self.num_pages * self.config.page_size} tokens ({self.num_pages} pages of "
            f"{self.config.page_size}), step budget {self.config.token_buckets[-1]} tokens"
        )

    # ---------------------------------------------------------------- callers' side

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None],
        request_id: str | None = None,
    ) -> str:
        """Queue a request; ``on_output`` is called on the engine thread after each new token
        and once with ``finished=True``. Returns the request id.

        Raises:
            ValueError: empty prompt, token ids outside the vocabulary, prompt plus
                ``max_tokens`` longer than the context, stop strings without a tokenizer.
            QueueFullError: ``max_queue`` requests are already waiting.
        """
        self._validate(prompt, params)
        number = next(self._ids)
        request_id = request_id or f"req-{number}"
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        prompt = [int(t) for t in prompt]
        limit = min(len(prompt) + params.max_tokens, self.max_model_len)
        seq = RequestState(request_id, prompt, params, seed % 2**32, number, limit=limit)
        if params.response_format is not None:  # compiled here, off the engine thread
            seq.matcher = self._grammars.matcher(params.response_format)
        processor = OutputProcessor(
            request_id, prompt, params, self.tokenizer, self.eos_ids, self.max_model_len
        )
        request = _Request(seq, on_output, time.monotonic(), processor)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self.num_waiting >= self.config.max_queue:
                raise QueueFullError(
                    f"{self.num_waiting} requests are waiting (max_queue={self.config.max_queue})"
                )
            self._live.add(request_id)
        self._inbox.put(("add", request))
        return request_id

    def cancel(self, request_id: str) -> None:
        """End a request now (its pages are freed on the engine's next iteration); it reports
        ``finish_reason="cancelled"``. Unknown or finished ids are ignored."""
        self._inbox.put(("cancel", request_id))

    def shutdown(self) -> None:
        """Cancel every request and stop the engine thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join()

    @property
    def num_waiting(self) -> int:
        """Unfinished requests not running now (new, or preempted to be resumed)."""
        return len(self._live) - len(self.scheduler.running)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Whether the engine thread runs and the device serves steps: False after a failed
        step until the KV pages are rebuilt and a probe step has run."""
        return self.alive and self._healthy

    @property
    def phase_seconds(self) -> dict[str, float]:
        """Wall seconds the engine thread spent in each phase since start-up (also the
        Prometheus counter ``jaxstack_engine_phase_seconds_total{phase}``): ``schedule``,
        ``pack``, ``dispatch`` (launching the step), ``device`` (waiting for its tokens),
        ``output`` (detokenization, stop strings, callbacks)."""
        return dict(self._phase_seconds)

    def _timed(self, phase: str, start: float) -> float:
        """Add the time since ``start`` to ``phase``; returns now."""
        now = time.perf_counter()
        self._phase_seconds[phase] += now - start
        self.metrics.phase_seconds.labels(phase).inc(now - start)
        return now

    @property
    def num_compilations(self) -> int:
        """Times the step function was compiled (fixed after start-up)."""
        return self.runner.num_traces

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not isinstance(t, int | np.integer) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens, more than the model's context of {self.max_model_len}; "
                "shorten the prompt or lower max_tokens"
            )
        if math.ceil(total / self.config.page_size) > self.num_pages:
            raise ValueError(
                f"{total} tokens need more than the {self.num_pages} KV pages of "
                f"{self.config.page_size} tokens; raise num_pages or lower max_tokens"
            )
        if (params.stop or params.response_format) and self.tokenizer is None:
            raise ValueError("stop strings and response_format need an engine with a tokenizer")
        outside = [t for t in (*params.logit_bias, *params.stop_token_ids) if t >= vocab]
        if outside:
            raise ValueError(f"token ids {outside} of logit_bias / stop_token_ids are outside "
                             f"the vocabulary [0, {vocab})")  # fmt: skip
        masked = len(params.stop_token_ids) + len(self.eos_ids) if params.min_tokens else 0
        if len(params.logit_bias) + masked > BIAS_SLOTS:
            raise ValueError(
                f"{len(params.logit_bias)} logit_bias entries and {masked} stop ids masked by "
                f"min_tokens exceed the {BIAS_SLOTS} a request may bias; use fewer"
            )

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            idle = self._inflight is None and not self.scheduler.has_work()
            if not self._drain(block=idle or not self._healthy):
                break
            if not self._healthy:
                if time.monotonic() >= self._next_recovery:
                    self._recover()
                continue
            self._scheduled = []
            try:
                self._iterate()
            except Exception as error:  # never let one request kill the engine
                log.exception("engine step failed")
                for seq, _ in self._scheduled:
                    self._finish(self._requests.get(seq.request_id), "error", repr(error))
        for request in list(self._requests.values()):
            self._finish(request, "cancelled")

    def _drain(self, block: bool) -> bool:
        """Apply queued adds and cancels; False once asked to stop."""
        try:
            item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload = item
            if kind == "stop":
                return False
            if kind == "add":
                self._requests[payload.seq.request_id] = payload
                self.scheduler.add(payload.seq)
            else:
                self._finish(self._requests.get(payload), "cancelled")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _unblock(self) -> None:
        """Nothing could be scheduled: with nothing running, the oldest waiting request
        cannot fit even alone, so it fails instead of blocking the queue."""
        if self.scheduler.waiting and not self.scheduler.running:
            seq = self.scheduler.waiting[0]
            message = f"request {seq.request_id} does not fit into the free KV cache pages"
            self._finish(self._requests.get(seq.request_id), "error", message)

    def _iterate(self) -> None:
        """Schedule, pack and dispatch the next step (``_scheduled``), then read and report the
        tokens of the one before it (still running meanwhile); without ``async_scheduling``,
        of this one. A step with a sequence that needs its last token on the host to be
        packed (a grammar's mask, penalties over its tokens) waits for the one before."""
        start = time.perf_counter()
        self._scheduled = step = self.scheduler.schedule()
        start = self._timed("schedule", start)
        if self._inflight is not None and any(_needs_host_tokens(seq) for seq, _ in step):
            flight, self._inflight = self._inflight, None
            self._resolve(flight)
            start = time.perf_counter()
            live = self._requests
            step = [(q, n) for q, n in step if q.request_id in live and live[q.request_id].seq is q]
            self._scheduled = step
        launched = None
        if step:
            inputs = self.runner.pack(step)
            start = self._timed("pack", start)
            previous = self._inflight.sampled[0] if self._inflight is not None else None
            try:
                sampled = self.runner.dispatch(inputs, previous)
            except Exception as error:
                self._step_failed(step, error)
                return
            self.scheduler.advance(step)
            rows = []
            for row, (seq, _) in enumerate(step):
                if not seq.num_pending:  # it reached its last token: one is sampled
                    rows.append((row, seq, seq.num_tokens))
                    seq.add_unresolved(row)
            wanted = bool(np.any(np.asarray(inputs.controls.num_logprobs) >= 0))
            launched = _InFlight(step, sampled, rows, wanted)
            self._timed("dispatch", start)
        elif self._inflight is None:
            self._unblock()
            return
        done, self._inflight = self._inflight, launched
        if not self.config.async_scheduling:
            done, self._inflight = launched, None
        if done is not None:
            self._resolve(done)

    def _resolve(self, flight: _InFlight) -> None:
        """Wait for ``flight``'s sampled tokens and report them."""
        start = time.perf_counter()
        try:
            tokens, logprobs = flight.sampled
            outputs = StepOutputs(
                np.asarray(tokens), jax.device_get(logprobs) if flight.logprobs else None
            )
        except Exception as error:  # the step failed on the device
            self._step_failed(flight.step, error)
            return
        start = self._timed("device", start)
        now, produced = time.monotonic(), 0
        for row, seq, index in flight.rows:
            token = int(outputs.tokens[row])
            seq.resolve(index, token)
            self.scheduler.register_pages(seq)
            request = self._requests.get(seq.request_id)
            if request is None or request.seq is not seq:  # finished meanwhile: discarded
                continue
            if seq.matcher is not None and not seq.matcher.is_terminated():
                seq.matcher.accept_token(token)
            logprob = None
            if seq.params.logprobs is not None:
                logprob = _token_logprob(outputs, row, seq.params.logprobs)
            produced += 1
            try:
                self._report(request, token, logprob, now)
            except Exception as error:
                log.exception("reporting request %s failed", seq.request_id)
                self._finish(request, "error", repr(error))
        self.metrics.on_tokens(produced)
        self._timed("output", start)

    def _step_failed(self, step: list[tuple[RequestState, int]], error: Exception) -> None:
        """A device step raised: end the requests that exhausted their retries, re-queue
        every other running request for recompute, and rebuild the KV pages."""
        log.exception("engine step failed; rebuilding the KV cache")
        self._healthy = False
        self.metrics.step_failures.inc()
        self._inflight = None  # its pages are gone too: every unresolved token is recomputed
        for request in self._requests.values():
            request.seq.drop_unresolved()
        self.scheduler.requeue_running()
        self.cache.clear()
        self._recover()
        retries = self.config.step_retries
        for seq, _ in step:  # reported once the engine is healthy again (if it is)
            request = self._requests[seq.request_id]
            request.failed_steps += 1
            if request.failed_steps > retries:
                message = (
                    f"the device step failed {request.failed_steps} times while computing "
                    f"this request (step_retries={retries}); last error: {error!r}"
                )
                self._finish(request, "error", message)

    def _recover(self) -> None:
        """Rebuild the KV pages and run a probe step; healthy again if it runs, else retried
        after ``RECOVERY_RETRY_S``."""
        try:
            self.runner.reset_pages()
            self.runner.probe()
        except Exception:
            log.exception("rebuilding the KV cache failed; retrying in %g s", RECOVERY_RETRY_S)
            self._next_recovery = time.monotonic() + RECOVERY_RETRY_S
            return
        self._healthy = True
        log.warning("engine recovered: KV cache rebuilt, running requests recompute")

    def _report(self, request: _Request, token: int, logprob, now: float) -> None:
        """Tell the caller about the new token; finish the request at a stop or the limit."""
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.ttft.observe(now - request.arrival_time)
        output = request.processor.add_token(token, logprob)
        request.on_output(output)
        if output.finished:
            self._remove(request, output.finish_reason)

    def _finish(self, request: _Request | None, reason: str, error: str | None = None) -> None:
        """End ``request`` early (cancelled or failed) with a final report."""
        if request is None or request.seq.request_id not in self._requests:
            return
        try:
            request.on_output(request.processor.report(reason, error))
        except Exception:
            log.exception("final report of request %s failed", request.seq.request_id)
        self._remove(request, reason)

    def _remove(self, request: _Request, reason: str) -> None:
        seq = request.seq
        self.scheduler.remove(seq)
        del self._requests[seq.request_id]
        with self._lock:
            self._live.discard(seq.request_id)
        self.metrics.requests.labels(reason).inc()
        finished, produced = reason in ("stop", "length"), request.processor.num_tokens
        if finished and request.first_token_time is not None and produced > 1:
            gap = time.monotonic() - request.first_token_time
            self.metrics.tpot.observe(gap / (produced - 1))

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
from dataclasses import dataclass, field, fields

import numpy as np
from jax.sharding import Mesh

from jaxstack.data.tokenizers import Tokenizer, decode_continuation
from jaxstack.models.llama import Llama
from jaxstack.serve.kv_cache import KVCacheManager
from jaxstack.serve.metrics import EngineMetrics
from jaxstack.serve.runner import ModelRunner, StepOutputs
from jaxstack.serve.sampling import BIAS_SLOTS, SamplingParams, TokenLogprob
from jaxstack.serve.scheduler import RequestState, Scheduler
from jaxstack.serve.structured import Grammars

log = logging.getLogger("jaxstack.serve")
RECOVERY_RETRY_S = 1.0
"""Seconds between attempts to rebuild the KV pages while the device keeps failing."""


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the KV cache and of the compiled step shapes."""

    page_size: int = 16
    """Token slots per KV page."""
    num_pages: int = 1024
    """KV pages per layer (cache memory: layers x pages x page_size x 2 x kv_heads x head_dim)."""
    max_model_len: int | None = None
    """Longest prompt + output; default the model's ``max_seq_len``."""
    token_buckets: tuple[int, ...] = (1, 4, 16, 32, 64, 128, 256)
    """Tokens per step the step is compiled for; the largest is the per-step token budget
    (prefill chunks fill what decodes leave). A step's matmuls cost its bucket's tokens, so
    the small ones keep a lone decode at one row of work (docs/serving.md, "Step shapes")."""
    seq_buckets: tuple[int, ...] = (1, 4, 16, 32, 64)
    """Sequences per step compiled for; the largest is the most requests running at once.
    Every (tokens, sequences) pair with sequences <= tokens is compiled at start (25 with
    the defaults)."""
    max_queue: int = 1024
    """Requests waiting to start before ``submit`` raises ``QueueFullError``."""
    prefix_caching: bool = True
    """Share full KV pages between requests with the same token prefix."""
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
        for name in ("page_size", "num_pages", "max_queue"):
            if getattr(self, name) < 1:
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


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


@dataclass
class RequestOutput:
    """A request's state as reported to its caller after each new token and at the end."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Every output token so far (a stop token included; at a stop string, the tokens
    before it)."""
    new_token_ids: list[int]
    """Tokens since the previous report."""
    text: str = ""
    """Decoded output so far (ends before a stop string); empty without a tokenizer."""
    delta: str = ""
    """Text since the previous report."""
    finished: bool = False
    finish_reason: str | None = None
    """``stop`` (EOS, a stop token or string), ``length``, ``cancelled`` or ``error``."""
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    """One per ``token_ids`` entry when the request asked (``SamplingParams.logprobs``)."""


@dataclass(eq=False)
class _Request:
    seq: RequestState
    on_output: Callable[[RequestOutput], None]
    arrival_time: float
    first_token_time: float | None = None
    reported_tokens: int = 0
    text: str = ""
    sent_chars: int = 0
    stops: tuple[str, ...] = field(default_factory=tuple)
    kept_tokens: int | None = None  # output tokens before a stop string's cut (None: all)
    failed_steps: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
        self._grammars = Grammars(tokenizer, model.config.vocab_size, self.eos_ids)
        self.cache = KVCacheManager(config.num_pages, config.page_size, config.prefix_caching)
        self.scheduler = Scheduler(
            self.cache,
            max_num_tokens=config.token_buckets[-1],
            max_num_seqs=config.seq_buckets[-1],
        )
        variables = params.get("params", params)
        self.runner = ModelRunner(
            model,
            variables,
            num_pages=config.num_pages,
            page_size=config.page_size,
            pages_per_seq=math.ceil(self.max_model_len / config.page_size),
            token_buckets=config.token_buckets,
            seq_buckets=config.seq_buckets,
            mesh=mesh,
            eos_ids=self.eos_ids,
        )
        self.runner.warmup(progress)
        self.metrics = EngineMetrics(
            {
                "queue_depth": lambda: self.num_waiting,
                "running_requests": lambda: len(self.scheduler.running),
                "kv_pages_used": lambda: self.cache.num_used,
            }
        )
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
        seq = RequestState(request_id, [int(t) for t in prompt], params, seed % 2**32, number)
        if params.response_format is not None:  # compiled here, off the engine thread
            seq.matcher = self._grammars.matcher(params.response_format)
        request = _Request(seq, on_output, time.monotonic(), stops=params.stop)
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
        if math.ceil(total / self.config.page_size) > self.config.num_pages:
            raise ValueError(
                f"{total} tokens need more than the {self.config.num_pages} KV pages of "
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
            if not self._drain(block=not self.scheduler.has_work() or not self._healthy):
                break
            if not self._healthy:
                if time.monotonic() >= self._next_recovery:
                    self._recover()
                continue
            step = []
            try:
                step = self.scheduler.schedule()
                if not step:
                    self._unblock()
                    continue
                self._run(step)
            except Exception as error:  # never let one request kill the engine
                log.exception("engine step failed")
                for seq, _ in step:
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

    def _run(self, step: list[tuple[RequestState, int]]) -> None:
        inputs = self.runner.pack(step)
        try:
            outputs = self.runner.run(inputs)
        except Exception as error:
            self._step_failed(step, error)
            return
        self.scheduler.advance(step)
        now, produced = time.monotonic(), 0
        for row, (seq, _) in enumerate(step):
            request = self._requests[seq.request_id]
            if seq.num_pending:  # a prefill chunk that did not reach the prompt's end
                continue
            seq.output.append(int(outputs.tokens[row]))
            if seq.matcher is not None and not seq.matcher.is_terminated():
                seq.matcher.accept_token(seq.output[-1])
            if seq.params.logprobs is not None:
                request.logprobs.append(_token_logprob(outputs, row, seq.params.logprobs))
            produced += 1
            try:
                self._report(request, now)
            except Exception as error:
                log.exception("reporting request %s failed", seq.request_id)
                self._finish(request, "error", repr(error))
        self.metrics.on_tokens(produced)

    def _step_failed(self, step: list[tuple[RequestState, int]], error: Exception) -> None:
        """A device step raised: end the requests that exhausted their retries, re-queue
        every other running request for recompute, and rebuild the KV pages."""
        log.exception("engine step failed; rebuilding the KV cache")
        self._healthy = False
        self.metrics.step_failures.inc()
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

    def _report(self, request: _Request, now: float) -> None:
        """Tell the caller about the new token; finish the request at a stop or the limit."""
        seq, params = request.seq, request.seq.params
        if request.first_token_time is None:
            request.first_token_time = now
            self.metrics.ttft.observe(now - request.arrival_time)
        token = seq.output[-1]
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        reason = None
        if token in stop_ids:
            reason = "stop"
        elif len(seq.output) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        visible = request.text
        if self.tokenizer is not None:
            request.text = visible = decode_continuation(self.tokenizer, seq.prompt, seq.output)
            stops = request.stops if len(seq.output) >= params.min_tokens else ()
            cut = min((i for s in stops if (i := visible.find(s)) >= 0), default=-1)
            if cut >= 0:
                request.text = visible = visible[:cut]
                request.kept_tokens = self._tokens_for(seq.prompt, seq.output, visible)
                reason = "stop"
            if reason is None:  # hold back what may still become a stop string or a character
                hold = max((len(s) - 1 for s in request.stops), default=0)
                visible = visible[: len(visible) - hold].rstrip("\ufffd")
        self._send(request, visible, finished=reason is not None, reason=reason)
        if reason is not None:
            self._remove(request, reason)

    def _tokens_for(self, prompt: list[int], tokens: list[int], text: str) -> int:
        """The fewest leading ``tokens`` whose decoding after ``prompt`` starts with ``text``
        (a prefix of the decoding of all of them), by bisection: what a stop string's cut
        keeps."""
        low, high = 0, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if decode_continuation(self.tokenizer, prompt, tokens[:middle]).startswith(text):
                high = middle
            else:
                low = middle + 1
        return low

    def _send(self, request: _Request, visible: str, *, finished: bool, reason=None, error=None):
        seq = request.seq
        delta = visible[request.sent_chars :] if len(visible) > request.sent_chars else ""
        request.sent_chars = max(request.sent_chars, len(visible))
        tokens = seq.output[: request.kept_tokens]
        new_tokens = tokens[request.reported_tokens :]
        request.reported_tokens = len(seq.output)
        output = RequestOutput(
            seq.request_id,
            seq.prompt,
            tokens,
            new_tokens,
            request.text,
            delta,
            finished,
            reason,
            error,
            request.logprobs[: len(tokens)] if seq.params.logprobs is not None else None,
        )
        request.on_output(output)

    def _finish(self, request: _Request | None, reason: str, error: str | None = None) -> None:
        """End ``request`` early (cancelled or failed) with a final report."""
        if request is None or request.seq.request_id not in self._requests:
            return
        try:
            self._send(request, request.text, finished=True, reason=reason, error=error)
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
        finished = reason in ("stop", "length")
        if finished and request.first_token_time is not None and len(seq.output) > 1:
            gap = time.monotonic() - request.first_token_time
            self.metrics.tpot.observe(gap / (len(seq.output) - 1))

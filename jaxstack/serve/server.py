"""The OpenAI-compatible HTTP server: a thin FastAPI app over one ``LLM``'s engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
for server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 for a prompt longer
than the context, invalid sampling parameters or a field it does not implement
(``protocol.py``), 401 for a missing or wrong API key, 413 for
a body over the size cap, 429 with ``Retry-After`` when the queue or the stream slots are
full. A request whose client goes away (mid-stream or while waiting), or stops reading its
stream for ``ServerConfig.stream_timeout_s``, is cancelled at once, which frees its KV pages.
"""

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from jaxstack.data.chat import FALLBACK_CHAT_TEMPLATE
from jaxstack.serve.engine import QueueFullError, RequestOutput
from jaxstack.serve.llm import LLM
from jaxstack.serve.protocol import ChatRequest, CompletionRequest, SamplingFields
from jaxstack.serve.sampling import SamplingParams, TokenLogprob
from jaxstack.serve.security import RequestGuard, error_response
from jaxstack.serve.server_config import ServerConfig, exposure_warning

log = logging.getLogger("jaxstack.serve")

MAX_N = 16
"""Most choices (``n``) one request may ask for."""
DISCONNECT_POLL_S = 0.05
"""How often a request awaiting a whole (not streamed) answer checks its client is there."""


class _BadRequest(Exception):
    pass


def create_app(llm: LLM, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``llm`` (its engine thread must be running), guarded by
    ``config`` (default ``ServerConfig()``: no API key, the default limits)."""
    config = config or ServerConfig()
    engine, tokenizer = llm.engine, llm.tokenizer
    if tokenizer is None:
        raise ValueError("the server needs an LLM with a tokenizer")
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template.globals["raise_exception"] = _raise_template_error
    chat_template = template.from_string(llm.chat_template or FALLBACK_CHAT_TEMPLATE)
    app = FastAPI(title="jaxstack", version="0.1.0")
    app.add_middleware(
        RequestGuard,
        api_keys=config.api_keys,
        protect_metrics=config.protect_metrics,
        max_body_bytes=config.max_body_bytes,
    )
    app.state.open_streams = 0
    retry_after = {"Retry-After": str(config.retry_after_s)}

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for e in error.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            text = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            text = text.removeprefix("Value error, ")
            problems.append(f"{where}: {text}" if where else text)
        return error_response(400, f"invalid request: {'; '.join(problems)}")

    @app.exception_handler(_BadRequest)
    async def bad_request(_: Request, error: _BadRequest) -> JSONResponse:
        return error_response(400, str(error))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.healthy:
            status = "engine recovering" if engine.alive else "engine stopped"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": llm.name, "object": "model", "created": 0, "owned_by": "jaxstack"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise _BadRequest("a list of prompts is not supported; send one per request")
            prompt = prompt[0]
        # tokenizing a long prompt takes a while: in a worker thread, not on the event loop
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(llm.encode, prompt)
        else:
            ids = list(prompt)
        params = _sampling(body, body.max_tokens)
        return await _respond(request, ids, params, "text_completion", body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        ids = await asyncio.to_thread(_chat_prompt, body)  # off the event loop, as above
        limit = body.max_completion_tokens
        limit = body.max_tokens if limit is None else limit
        params = _sampling(body, _rest_of_context(len(ids)) if limit is None else limit)
        return await _respond(request, ids, params, "chat.completion", body)

    def _chat_prompt(body: ChatRequest) -> list[int]:
        """The token ids of ``body``'s messages rendered by the chat template."""
        try:
            text = chat_template.render(
                messages=[m.model_dump(exclude_none=True) for m in body.messages],
                add_generation_prompt=True,
                **{"bos_token": "", "eos_token": "", **llm.chat_tokens},
            )
        except Exception as error:
            raise _BadRequest(f"the chat template failed on these messages: {error}") from None
        return tokenizer.encode(text, add_bos=False)

    async def _respond(request: Request, ids: list[int], params: SamplingParams, kind: str,
                       body: SamplingFields):  # fmt: skip
        """Submit the request (``n`` of them, seeds ``seed + i``, for ``n`` choices) and
        answer with its output, whole or streamed."""
        stream = body.stream
        loop = asyncio.get_running_loop()
        events = _Outputs(loop, every=stream)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        ids_of = [request_id] if body.n == 1 else [f"{request_id}-{i}" for i in range(body.n)]
        if stream and app.state.open_streams >= config.max_streams:
            message = f"server busy: {config.max_streams} streams are open (--max-streams)"
            return error_response(429, message, "rate_limit_error", retry_after)

        def cancel_all() -> None:
            for rid in ids_of:
                engine.cancel(rid)  # a no-op once the request finished

        async def submit(*args, **kwargs) -> None:
            if params.response_format is None:
                engine.submit(*args, **kwargs)
            else:  # compiling a grammar may take a while: off the event loop
                await asyncio.to_thread(engine.submit, *args, **kwargs)

        for index, rid in enumerate(ids_of):
            seed = params.seed if params.seed is None else params.seed + index
            try:
                await submit(
                    ids,
                    dataclasses.replace(params, seed=seed),
                    lambda out, i=index: events.put(i, out),
                    request_id=rid,
                )
            except (QueueFullError, ValueError) as error:
                cancel_all()
                if isinstance(error, ValueError):
                    raise _BadRequest(str(error)) from None
                message = f"server busy: {error}"
                return error_response(429, message, "rate_limit_error", retry_after)
        meta = dict(id=request_id, created=int(time.time()), model=llm.name)
        formatter = _Formatter(kind, tokenizer.decode)
        if stream:
            app.state.open_streams += 1

            def close() -> None:
                app.state.open_streams -= 1
                cancel_all()

            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = _sse(events, body.n, formatter, meta, include_usage=usage)
            return _EventStream(chunks, close, config.stream_timeout_s, request_id)
        outs = await _final_outputs(request, events, body.n)
        if outs is None:  # the client went away: free its pages now
            cancel_all()
            return Response(status_code=499)
        failed = [out for out in outs if out.finish_reason == "error"]
        if failed:
            cancel_all()
            return error_response(500, f"generation failed: {failed[0].error}", "server_error")
        return formatter.response(outs, meta)

    def _rest_of_context(prompt_tokens: int) -> int:
        """A chat reply's default length: whatever the context (and the KV cache) leaves."""
        room = min(engine.max_model_len, engine.num_pages * engine.config.page_size)
        if prompt_tokens >= room:
            raise _BadRequest(
                f"the messages take {prompt_tokens} tokens and the context holds {room}: no "
                "room for a reply; shorten them"
            )
        return room - prompt_tokens

    def _sampling(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
        if not 1 <= body.n <= MAX_N:
            raise _BadRequest(f"n={body.n} must be in [1, {MAX_N}]")
        try:
            bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        except ValueError:
            raise _BadRequest(f"logit_bias keys must be token ids, got {body.logit_bias}") from None
        fmt = body.response_format
        try:
            return SamplingParams(
                max_tokens=16 if max_tokens is None else max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=body.seed,
                stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
                min_tokens=body.min_tokens,
                logprobs=body.num_logprobs,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=bias,
                response_format=None if fmt in (None, {"type": "text"}) else fmt,
            )
        except ValueError as error:
            raise _BadRequest(f"invalid sampling parameters: {error}") from None

    return app


class _StalledClient(Exception):
    pass


class _EventStream(StreamingResponse):
    """The server-sent events of one request. However the response ends (finished, client
    gone, or a send blocked for ``write_timeout_s`` because the client stopped reading),
    ``close`` runs once: it cancels the request if unfinished and frees its stream slot."""

    def __init__(self, chunks: AsyncIterator[str], close: Callable[[], None],
                 write_timeout_s: float, request_id: str):  # fmt: skip
        super().__init__(chunks, media_type="text/event-stream")
        self._close, self._timeout, self._request_id = close, write_timeout_s, request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message) -> None:
            try:
                async with asyncio.timeout(self._timeout):
                    await send(message)
            except TimeoutError:
                raise _StalledClient from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except* _StalledClient:
            log.warning(
                "request %s cancelled: its client read nothing for %g s",
                self._request_id,
                self._timeout,
            )
        finally:
            self._close()
            await self.body_iterator.aclose()


class _Outputs:
    """The outputs of one request's choices, handed from the engine thread to the event loop
    with one wakeup per batch: the engine thread only appends while a wakeup is pending, and
    a request that is not streamed (``every=False``) is handed only its final outputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every: bool):
        self._loop, self._every = loop, every
        self._items: deque[tuple[int, RequestOutput]] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._wake_pending = False

    def put(self, index: int, out: RequestOutput) -> None:
        """Choice ``index`` reports ``out`` (called on the engine thread)."""
        if not (self._every or out.finished):
            return
        with self._lock:
            self._items.append((index, out))
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def get_all(self) -> list[tuple[int, RequestOutput]]:
        """Every ``(choice, output)`` that arrived since the last call (waits for one)."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
            self._ready.clear()
            await self._ready.wait()


async def _sse(events: _Outputs, n: int, formatter: "_Formatter", meta: dict,
               include_usage: bool = False) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events of a request's ``n`` choices, interleaved as their tokens come,
    each chunk naming its choice's ``index``, up to the last output of every choice; with
    ``include_usage`` a last chunk (no choices) carries the token counts, as OpenAI's
    ``stream_options`` asks. The events of outputs that arrived together go out in one
    write."""
    chat = formatter.kind == "chat.completion"
    chunk = {**meta, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        for index in range(n):
            first = {"index": index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}  # fmt: skip
            yield _event({**chunk, "choices": [first]})
    finals: dict[int, RequestOutput] = {}
    offsets = [0] * n  # text offset of each choice's next token (completions logprobs)
    failed = False
    while len(finals) < n and not failed:
        batch = []
        for index, out in await events.get_all():
            if out.finish_reason == "error":
                batch.append(_event({"error": {"message": f"generation failed: {out.error}"}}))
                failed = True
                break
            if out.delta or out.finished:
                new = None
                if out.logprobs is not None:
                    new = out.logprobs[len(out.token_ids) - len(out.new_token_ids) :]
                logprobs, offsets[index] = formatter.logprobs(new, offsets[index])
                reason = out.finish_reason if out.finished else None
                choice = formatter.choice(index, out.delta, reason, logprobs, delta=True)
                batch.append(_event({**chunk, "choices": [choice]}))
            if out.finished:
                finals[index] = out
        if batch:
            yield "".join(batch)
    if not failed and include_usage:
        yield _event({**chunk, "choices": [], "usage": _usage(list(finals.values()))})
    yield "data: [DONE]\n\n"


async def _final_outputs(request: Request, events: _Outputs,
                         n: int) -> list[RequestOutput] | None:  # fmt: skip
    """The last output of each of the request's ``n`` choices, by index, or None as soon as
    its client disconnects (checked every ``DISCONNECT_POLL_S``, whether or not tokens
    arrive meanwhile)."""
    finals: dict[int, RequestOutput] = {}
    while True:
        try:
            arrived = await asyncio.wait_for(events.get_all(), timeout=DISCONNECT_POLL_S)
            for index, out in arrived:
                finals[index] = out
                if len(finals) == n or out.finish_reason == "error":
                    return [finals.get(i, out) for i in range(n)]
        except TimeoutError:
            pass
        if await request.is_disconnected():
            return None


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _Formatter:
    """OpenAI's JSON for one route (``kind``): choices, and log-probabilities in the
    completions format (``tokens``, ``token_logprobs``, ``top_logprobs`` with the sampled
    token among them, ``text_offset``) or the chat format (``content``: ``token``,
    ``logprob``, ``bytes``, ``top_logprobs``). Token texts are ``decode([id])``."""

    def __init__(self, kind: Literal["text_completion", "chat.completion"],
                 decode: Callable[[list[int]], str]):  # fmt: skip
        self.kind, self._decode = kind, decode

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs,
               delta: bool = False) -> dict[str, Any]:  # fmt: skip
        """One choice: a chunk's (``delta``) or a whole answer's."""
        if self.kind != "chat.completion":
            return {"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason}  # fmt: skip
        if delta:
            body = {"delta": {"content": text} if text else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}

    def response(self, outs: list[RequestOutput], meta: dict) -> dict:
        """The whole answer of a request whose choices ended with ``outs``."""
        choices = []
        for index, out in enumerate(outs):
            logprobs, _ = self.logprobs(out.logprobs, 0)
            choices.append(self.choice(index, out.text, out.finish_reason, logprobs))
        return {**meta, "object": self.kind, "choices": choices, "usage": _usage(outs)}

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int) -> tuple[Any, int]:
        """``entries`` in this route's format, and the text offset after them (None for a
        request without logprobs)."""
        if entries is None:
            return None, offset
        if self.kind == "chat.completion":
            content = []
            for e in entries:
                top = [self._token(i, lp) for i, lp in e.top]
                content.append({**self._token(e.token_id, e.logprob), "top_logprobs": top})
            return {"content": content, "refusal": None}, offset
        texts = [self._decode([e.token_id]) for e in entries]
        starts = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
        tops = []
        for e, text in zip(entries, texts, strict=True):
            top = {self._decode([i]): lp for i, lp in e.top}
            tops.append({**top, text: e.logprob})
        body = {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": tops, "text_offset": starts}  # fmt: skip
        return body, offset + sum(len(t) for t in texts)

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _usage(outs: list[RequestOutput]) -> dict[str, int]:
    """Token counts of a request: its prompt once, and every choice's output."""
    prompt = len(outs[0].prompt_token_ids)
    completion = sum(len(out.token_ids) for out in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def _raise_template_error(message: str):
    raise ValueError(message)


def serve(
    llm: LLM,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    config: ServerConfig | None = None,
) -> None:
    """Serve ``llm`` over HTTP until interrupted (``jaxstack serve``); warns when ``host`` is
    reachable from other machines and ``config`` has no API key."""
    config = config or ServerConfig()
    warning = exposure_warning(host, config.api_keys)
    if warning:
        log.warning(warning)
    uvicorn.run(create_app(llm, config), host=host, port=port, log_level=log_level)

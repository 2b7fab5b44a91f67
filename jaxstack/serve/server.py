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
from jaxstack.serve.sampling import SamplingParams
from jaxstack.serve.security import RequestGuard, error_response
from jaxstack.serve.server_config import ServerConfig, exposure_warning

log = logging.getLogger("jaxstack.serve")

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
        ids = llm.encode(prompt) if isinstance(prompt, str) else list(prompt)
        params = _sampling(body, body.max_tokens)
        return await _respond(request, ids, params, "text_completion", body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            text = chat_template.render(
                messages=[m.model_dump(exclude_none=True) for m in body.messages],
                add_generation_prompt=True,
                **{"bos_token": "", "eos_token": "", **llm.chat_tokens},
            )
        except Exception as error:
            raise _BadRequest(f"the chat template failed on these messages: {error}") from None
        ids = tokenizer.encode(text, add_bos=False)
        limit = body.max_completion_tokens
        limit = body.max_tokens if limit is None else limit
        params = _sampling(body, _rest_of_context(len(ids)) if limit is None else limit)
        return await _respond(request, ids, params, "chat.completion", body)

    async def _respond(request: Request, ids: list[int], params: SamplingParams, kind: str,
                       body: SamplingFields):  # fmt: skip
        stream = body.stream
        loop = asyncio.get_running_loop()
        events = _Outputs(loop, every=stream)
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        if stream and app.state.open_streams >= config.max_streams:
            message = f"server busy: {config.max_streams} streams are open (--max-streams)"
            return error_response(429, message, "rate_limit_error", retry_after)
        try:
            engine.submit(
                ids,
                params,
                events.put,
                request_id=request_id,
            )
        except QueueFullError as error:
            return error_response(429, f"server busy: {error}", "rate_limit_error", retry_after)
        except ValueError as error:
            raise _BadRequest(str(error)) from None
        meta = dict(id=request_id, created=int(time.time()), model=llm.name)
        if stream:
            app.state.open_streams += 1

            def close() -> None:
                app.state.open_streams -= 1
                engine.cancel(request_id)  # a no-op once the request finished

            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = _sse(events, kind, meta, include_usage=usage)
            return _EventStream(chunks, close, config.stream_timeout_s, request_id)
        out = await _final_output(request, events)
        if out is None:  # the client went away: free its pages now
            engine.cancel(request_id)
            return Response(status_code=499)
        if out.finish_reason == "error":
            return error_response(500, f"generation failed: {out.error}", "server_error")
        return _full_response(out, kind, meta)

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
        if body.n != 1:
            raise _BadRequest(f"n={body.n}: only n=1 is supported")
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
    """One request's outputs, handed from the engine thread to the event loop with one
    wakeup per batch: the engine thread only appends while a wakeup is pending, and a
    non-streamed request (``every=False``) wakes the loop only for its final output."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every: bool):
        self._loop, self._every = loop, every
        self._items: deque[RequestOutput] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._wake_pending = False

    def put(self, out: RequestOutput) -> None:
        """Called on the engine thread."""
        with self._lock:
            if not self._every:  # only the last output is read
                self._items.clear()
            self._items.append(out)
            if self._wake_pending or not (self._every or out.finished):
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def get_all(self) -> list[RequestOutput]:
        """Every output that arrived since the last call (waits for at least one)."""
        while True:
            with self._lock:
                if self._items and (self._every or self._items[-1].finished):
                    items = list(self._items)
                    self._items.clear()
                    return items
            self._ready.clear()
            await self._ready.wait()


async def _sse(events: _Outputs, kind: str, meta: dict,
               include_usage: bool = False) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events of one request, up to its last output (the events of outputs that
    arrived together go out in one write); with ``include_usage`` a last chunk (no choices)
    carries the token counts, as OpenAI's ``stream_options`` asks."""
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    if kind == "chat.completion":
        first = _choice(kind, delta={"role": "assistant", "content": ""})
        yield _event({**meta, "object": chunk_kind, "choices": [first]})
    finished = False
    while not finished:
        batch = []
        for out in await events.get_all():
            if out.finish_reason == "error":
                batch.append(_event({"error": {"message": f"generation failed: {out.error}"}}))
                finished = True
                break
            finished = out.finished
            reason = out.finish_reason if finished else None
            if out.delta or finished:
                body = {"content": out.delta} if kind == "chat.completion" else None
                choice = _choice(kind, delta=body, text=out.delta, finish_reason=reason)
                batch.append(_event({**meta, "object": chunk_kind, "choices": [choice]}))
            if finished:
                if include_usage:
                    usage = _usage(out)
                    batch.append(_event({**meta, "object": chunk_kind, "choices": [],
                                         "usage": usage}))  # fmt: skip
                break
        if batch:
            yield "".join(batch)
    yield "data: [DONE]\n\n"


async def _final_output(request: Request, events: _Outputs) -> RequestOutput | None:
    """The request's last output, or None as soon as its client disconnects (checked every
    ``DISCONNECT_POLL_S``, whether or not tokens arrive meanwhile)."""
    while True:
        try:
            return (await asyncio.wait_for(events.get_all(), timeout=DISCONNECT_POLL_S))[-1]
        except TimeoutError:
            pass
        if await request.is_disconnected():
            return None


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _choice(kind: str, *, delta=None, text: str = "", finish_reason=None) -> dict[str, Any]:
    if kind == "chat.completion":
        return {"index": 0, "delta": delta or {}, "finish_reason": finish_reason}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _full_response(out: RequestOutput, kind: Literal["text_completion", "chat.completion"],
                   meta: dict) -> dict:  # fmt: skip
    if kind == "chat.completion":
        message = {"role": "assistant", "content": out.text}
        choice = {"index": 0, "message": message, "finish_reason": out.finish_reason}
    else:
        choice = _choice(kind, text=out.text, finish_reason=out.finish_reason)
    return {**meta, "object": kind, "choices": [choice], "usage": _usage(out)}


def _usage(out: RequestOutput) -> dict[str, int]:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
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

"""The OpenAI-compatible HTTP server: a thin FastAPI app over one ``LLM``'s engine.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``
for server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 for a prompt longer
than the context or invalid sampling parameters, 429 with ``Retry-After`` when the queue is
full. A request whose client goes away (mid-stream or while waiting) is cancelled at once,
which frees its KV pages.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from jaxstack.serve.engine import Engine, QueueFullError, RequestOutput
from jaxstack.serve.llm import LLM
from jaxstack.serve.sampling import SamplingParams

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""Used when the model directory has no ``chat_template`` in ``tokenizer_config.json``."""
DISCONNECT_POLL_S = 0.05
"""How often a request awaiting a whole (not streamed) answer checks its client is there."""


class _Sampling(BaseModel):
    """Fields common to both endpoints (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BadRequest(Exception):
    pass


def create_app(llm: LLM, *, retry_after_s: int = 1) -> FastAPI:
    """The FastAPI app serving ``llm`` (its engine thread must be running)."""
    engine, tokenizer = llm.engine, llm.tokenizer
    if tokenizer is None:
        raise ValueError("the server needs an LLM with a tokenizer")
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template.globals["raise_exception"] = _raise_template_error
    chat_template = template.from_string(llm.chat_template or FALLBACK_CHAT_TEMPLATE)
    app = FastAPI(title="jaxstack", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}"
            for e in error.errors()
        )
        return _error(400, f"invalid request: {problems}")

    @app.exception_handler(_BadRequest)
    async def bad_request(_: Request, error: _BadRequest) -> JSONResponse:
        return _error(400, str(error))

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
        return await _respond(request, ids, params, "text_completion", body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            text = chat_template.render(
                messages=[m.model_dump() for m in body.messages],
                add_generation_prompt=True,
                **{"bos_token": "", "eos_token": "", **llm.chat_tokens},
            )
        except Exception as error:
            raise _BadRequest(f"the chat template failed on these messages: {error}") from None
        ids = tokenizer.encode(text, add_bos=False)
        limit = body.max_completion_tokens or body.max_tokens
        params = _sampling(body, limit)
        return await _respond(request, ids, params, "chat.completion", body.stream)

    async def _respond(request: Request, ids: list[int], params: SamplingParams, kind: str,
                       stream: bool):  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestOutput] = asyncio.Queue()
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        try:
            engine.submit(
                ids,
                params,
                lambda out: loop.call_soon_threadsafe(events.put_nowait, out),
                request_id=request_id,
            )
        except QueueFullError as error:
            headers = {"Retry-After": str(retry_after_s)}
            return _error(429, f"server busy: {error}", "rate_limit_error", headers)
        except ValueError as error:
            raise _BadRequest(str(error)) from None
        meta = dict(id=request_id, created=int(time.time()), model=llm.name)
        if stream:
            chunks = _sse(engine, events, request_id, kind, meta)
            return StreamingResponse(chunks, media_type="text/event-stream")
        out = await _final_output(request, events)
        if out is None:  # the client went away: free its pages now
            engine.cancel(request_id)
            return Response(status_code=499)
        if out.finish_reason == "error":
            return _error(500, f"generation failed: {out.error}", "server_error")
        return _full_response(out, kind, meta)

    def _sampling(body: _Sampling, max_tokens: int | None) -> SamplingParams:
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
                ignore_eos=body.ignore_eos,
            )
        except ValueError as error:
            raise _BadRequest(f"invalid sampling parameters: {error}") from None

    return app


async def _sse(
    engine: Engine, events: asyncio.Queue, request_id: str, kind: str, meta: dict
) -> AsyncIterator[str]:
    """Server-sent events of one request; cancels it if the client disconnects."""
    finished = False
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    try:
        if kind == "chat.completion":
            first = _choice(kind, delta={"role": "assistant", "content": ""})
            yield _event({**meta, "object": chunk_kind, "choices": [first]})
        while True:
            out: RequestOutput = await events.get()
            finished = out.finished
            if out.finish_reason == "error":
                yield _event({"error": {"message": f"generation failed: {out.error}"}})
                break
            reason = out.finish_reason if finished else None
            if out.delta or finished:
                body = {"content": out.delta} if kind == "chat.completion" else None
                choice = _choice(kind, delta=body, text=out.delta, finish_reason=reason)
                yield _event({**meta, "object": chunk_kind, "choices": [choice]})
            if finished:
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            engine.cancel(request_id)


async def _final_output(request: Request, events: asyncio.Queue) -> RequestOutput | None:
    """The request's last output, or None as soon as its client disconnects (checked every
    ``DISCONNECT_POLL_S``, whether or not tokens arrive meanwhile)."""
    loop = asyncio.get_running_loop()
    checked = loop.time()
    while True:
        try:
            out = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            if out.finished:
                return out
        except TimeoutError:
            pass
        if loop.time() - checked >= DISCONNECT_POLL_S:
            if await request.is_disconnected():
                return None
            checked = loop.time()


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
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    return {**meta, "object": kind, "choices": [choice], "usage": usage}


def _raise_template_error(message: str):
    raise ValueError(message)


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``llm`` over HTTP until interrupted (``jaxstack serve``)."""
    uvicorn.run(create_app(llm), host=host, port=port, log_level=log_level)

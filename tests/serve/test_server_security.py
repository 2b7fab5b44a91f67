"""API keys and per-client limits of the HTTP server (issue 27), over the shared engine: the
``openai`` client and plain HTTP against a real server on 127.0.0.1, and the ASGI app driven
directly where a stalled socket is the point."""

import asyncio
import json
import time
import tracemalloc

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from serve_helpers import EngineHold, cancelled, running_server, wait_until_idle

from jaxstack.cli import build_parser, serve_config
from jaxstack.serve import SamplingParams
from jaxstack.serve.server import ServerConfig, create_app
from jaxstack.serve.server_config import api_keys_from, exposure_warning

KEYS = ("key-a", "key-b")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
CONFIG = ServerConfig(
    api_keys=KEYS,
    protect_metrics=True,
    max_body_bytes=2**20,
    max_streams=2,
    stream_timeout_s=0.3,
    retry_after_s=3,
)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, CONFIG)


@pytest.fixture(scope="module")
def base_url(app):
    with running_server(app) as url:
        yield url


def test_no_or_wrong_key_is_401_and_the_right_key_serves(base_url, llm):
    for headers in ({}, {"Authorization": "Bearer key-c"}, {"Authorization": "Basic key-a"}):
        response = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "authentication_error" and error["code"] == 401
        assert "Authorization: Bearer" in error["message"]
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    assert httpx.get(f"{base_url}/v1/nowhere").status_code == 401  # unknown routes too
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="key-c", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert raised.value.status_code == 401

    expected = llm.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))[0].text
    for key in KEYS:  # every key is accepted
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
        options = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                       extra_body={"ignore_eos": True})  # fmt: skip
        assert client.completions.create(**options).choices[0].text == expected
        chunks = list(client.completions.create(**options, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
    lower = {"Authorization": f"bearer {KEYS[1]}"}  # the scheme is case-insensitive
    assert httpx.get(f"{base_url}/v1/models", headers=lower).status_code == 200


def test_health_is_open_and_metrics_follow_the_flag(base_url, llm):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/metrics").status_code == 401  # protect_metrics=True
    assert "jaxstack_kv_pages_used" in httpx.get(f"{base_url}/metrics", headers=AUTH).text
    default = TestClient(create_app(llm, ServerConfig(api_keys=KEYS)))
    assert default.get("/metrics").status_code == 200  # open unless protected
    assert default.get("/v1/models").status_code == 401


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_50_mb_body_is_413_without_being_held(base_url, declared):
    chunk = b" " * 2**16
    size = 800 * len(chunk)  # 50 MiB, sent from one reused buffer

    start = b'{"prompt": "x", "padding": "'

    def body():
        yield start
        for _ in range(800):
            yield chunk

    json_type = {**AUTH, "Content-Type": "application/json"}
    headers = {**json_type, "Content-Length": str(len(start) + size)} if declared else json_type
    tracemalloc.start()
    try:
        response = httpx.post(
            f"{base_url}/v1/completions", content=body(), headers=headers, timeout=60
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 413
    assert "limit of 1048576 bytes" in response.json()["error"]["message"]
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB allocated while refusing the body"
    # a chunked body under the limit is read and answered as usual
    small = [json.dumps({"prompt": "x", "max_tokens": 1}).encode()]
    ok = httpx.post(f"{base_url}/v1/completions", content=iter(small), headers=json_type)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_streams_over_the_cap_get_429_with_retry_after(base_url, app, llm):
    engine = llm.engine
    wait_until_idle(engine)
    body = {"prompt": PROMPT, "max_tokens": 8, "stream": True}
    hold = EngineHold(engine)  # the streams below stay open: no token moves meanwhile
    try:
        assert hold.entered.wait(timeout=30)
        http = httpx.Client(base_url=base_url, headers=AUTH, timeout=60)
        with (
            http,
            http.stream("POST", "/v1/completions", json=body) as one,
            http.stream("POST", "/v1/completions", json=body) as two,
        ):
            assert one.status_code == two.status_code == 200
            third = http.post("/v1/completions", json=body)
            assert third.status_code == 429
            assert third.headers["retry-after"] == "3"
            assert third.json()["error"]["type"] == "rate_limit_error"
            assert app.state.open_streams == 2
    finally:
        hold.release()
    wait_until_idle(engine)
    deadline = time.monotonic() + 10
    while app.state.open_streams:  # the slots come back once the streams end
        assert time.monotonic() < deadline, f"{app.state.open_streams} stream slots held"
        time.sleep(0.02)


def test_a_client_that_stops_reading_is_cancelled_and_frees_its_pages(app, llm):
    """Loopback socket buffers take the tiny model's whole output, so a stalled socket is
    what the app sees of such a client: a ``send`` that never returns."""
    engine = llm.engine
    wait_until_idle(engine)
    idle_free, before = engine.cache.num_free, cancelled(engine)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "stream": True, "ignore_eos": True})
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn's
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer key-a")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    requests = [{"type": "http.request", "body": body.encode(), "more_body": False}]
    sent, holds = [], []

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # connected: never a disconnect

    async def send(message):
        sent.append(message)
        if message.get("body"):  # the first token's event: the client reads nothing more
            holds.append((EngineHold(engine), engine.cache.num_used))
            await asyncio.Event().wait()

    async def run() -> float:
        start = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        took = time.monotonic() - start
        holds[0][0].release()  # the engine goes on while this loop still takes its outputs
        await asyncio.to_thread(wait_until_idle, engine, 10)
        return took

    try:
        took = asyncio.run(run())
    finally:
        for hold, _ in holds:
            hold.release()
    (_, used_at_stall), = holds  # fmt: skip
    assert sent[0]["status"] == 200 and len(sent) == 2
    assert used_at_stall > 0  # the stalled request held pages
    assert took < CONFIG.stream_timeout_s + 5
    assert app.state.open_streams == 0
    assert engine.cache.num_free == idle_free
    assert cancelled(engine) == before + 1  # cancelled, not run to its 100 tokens


def test_exposure_warning_and_keys_from_flags_or_environment():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host, ()) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "node-7"):
        assert "without an API key" in exposure_warning(host, ())
        assert exposure_warning(host, ("k",)) is None
    environ = {"JAXSTACK_API_KEY": " k1, k2 ,,"}
    assert api_keys_from(None, environ) == ("k1", "k2")
    assert api_keys_from(["f1"], environ) == ("f1",)  # flags win
    assert api_keys_from(None, {}) == ()
    with pytest.raises(ValueError, match="spaces, commas"):
        api_keys_from(["two words"])
    with pytest.raises(ValueError, match="max_streams=0"):
        ServerConfig(max_streams=0)


def test_serve_flags_make_the_server_config(monkeypatch):
    monkeypatch.setenv("JAXSTACK_API_KEY", "from-env")
    flags = ["serve", "--hf", "d", "--max-body-mb", "0.5", "--max-streams", "3",
             "--stream-timeout", "9", "--protect-metrics"]  # fmt: skip
    config = serve_config(build_parser().parse_args(flags))
    assert config == ServerConfig(
        api_keys=("from-env",),
        protect_metrics=True,
        max_body_bytes=2**19,
        max_streams=3,
        stream_timeout_s=9.0,
    )
    flags += ["--api-key", "a", "--api-key", "b"]
    assert serve_config(build_parser().parse_args(flags)).api_keys == ("a", "b")
    assert serve_config(build_parser().parse_args(["serve", "--hf", "d"])) == ServerConfig(
        api_keys=("from-env",)
    )

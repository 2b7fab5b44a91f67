"""Tokenization and chat-template rendering run in worker threads: a slow one does not hold
up the event loop (``/health`` answers meanwhile)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_helpers import running_server

from jaxstack.serve.server import create_app

REQUESTS = [
    ("/v1/completions", {"prompt": "slow", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 2}),
]


def test_a_slow_tokenization_does_not_block_health(llm, monkeypatch):
    encode = llm.tokenizer.encode
    entered, release = threading.Event(), threading.Event()

    def slow_encode(text: str, **options) -> list[int]:  # held until /health has answered
        entered.set()
        release.wait(timeout=30)
        return encode(text, **options)

    monkeypatch.setattr(llm.tokenizer, "encode", slow_encode)
    with running_server(create_app(llm)) as url, ThreadPoolExecutor(1) as pool:
        for route, body in REQUESTS:
            entered.clear()
            release.clear()
            answer = pool.submit(httpx.post, url + route, json=body, timeout=60)
            try:
                assert entered.wait(timeout=30)
                # on the event loop, the held encode would keep /health from answering
                assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
            finally:
                release.set()
            assert answer.result().status_code == 200, (route, answer.result().text)

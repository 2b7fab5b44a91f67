"""One tiny model and one compiled serving engine shared by every serving test."""

import contextlib
import threading
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

from jaxstack.data import ByteTokenizer
from jaxstack.generate import generate
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM

EOS = ByteTokenizer.eos_id
ENGINE_OPTIONS = dict(
    page_size=4,
    num_pages=48,  # 192 token slots: eight running requests overflow it (preemption)
    max_model_len=128,
    token_buckets=(8, 32),  # prompts over 32 tokens are prefilled in chunks
    seq_buckets=(8,),
    max_queue=96,
)
# staggered workload: ragged prompts (some longer than the token budget) and output lengths
PROMPT_LENS = (5, 37, 3, 50, 9, 23, 11, 2, 61, 14)
MAX_TOKENS = (7, 12, 20, 5, 16, 9, 30, 14, 6, 25)


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer GQA Llama with weights large enough that greedy choices are clear-cut."""
    model = Llama(preset("tiny", num_layers=2, initializer_range=0.1, max_seq_len=128))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="session")
def llm(tiny):
    model, params = tiny
    engine = LLM(model, params, tokenizer=ByteTokenizer(), progress=False, **ENGINE_OPTIONS)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def workload(tiny):
    """Prompts, output limits and the tokens ``js.generate`` gives each (greedy, stops at
    EOS), from one batched call."""
    model, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in PROMPT_LENS]
    full = generate(model, params, prompts, max_new_tokens=max(MAX_TOKENS), eos_id=EOS)
    return (
        prompts,
        list(MAX_TOKENS),
        [tokens[:m] for tokens, m in zip(full, MAX_TOKENS, strict=True)],
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

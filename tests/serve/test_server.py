"""The real HTTP server on 127.0.0.1, driven by the ``openai`` client and ``httpx``."""

import asyncio
import contextlib
import json
import socket
import struct
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import EngineHold, cancelled, running_server, wait_until_idle

from jaxstack.serve import SamplingParams
from jaxstack.serve.engine import QueueFullError
from jaxstack.serve.server import ServerConfig, create_app

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def base_url(llm):
    with running_server(create_app(llm, ServerConfig(retry_after_s=2))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_completions_plain_and_streamed(client, llm):
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    done = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].text == expected.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 12
    assert done.usage.prompt_tokens == len(expected.prompt_token_ids)
    chunks = list(
        client.completions.create(
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            model="tiny",
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_plain_and_streamed(client, llm):
    # no chat_template in this model: the fallback renders "user: hi\nassistant: " (no BOS)
    prompt = llm.tokenizer.encode("user: hi\nassistant: ")
    expected = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    options = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                   temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    done = client.chat.completions.create(**options)
    assert done.choices[0].message.content == expected.text
    assert done.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(**options, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    counted = list(
        client.chat.completions.create(
            **options, stream=True, stream_options={"include_usage": True}
        )
    )
    assert [c.usage for c in counted[:-1]] == [None] * (len(counted) - 1)
    assert counted[-1].choices == [] and counted[-1].usage.model_dump() == {
        **counted[-1].usage.model_dump(),
        "prompt_tokens": len(prompt),
        "completion_tokens": 8,
        "total_tokens": len(prompt) + 8,
    }
    assert "".join(c.choices[0].delta.content or "" for c in counted[:-1]) == expected.text


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(client, llm):
    prompt = llm.tokenizer.encode("user: hi\nassistant: ")
    rest = llm.engine.max_model_len - len(prompt)
    params = SamplingParams(max_tokens=rest, ignore_eos=True)
    expected = llm.generate([prompt], params)[0]
    hi = [{"role": "user", "content": "hi"}]
    done = client.chat.completions.create(
        model="tiny", messages=hi, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == rest == 108  # not the completions default of 16
    assert done.choices[0].message.content == expected.text
    assert done.choices[0].finish_reason == "length"
    too_long = [{"role": "user", "content": "x" * 120}]  # 138 tokens rendered: no room
    with pytest.raises(openai.BadRequestError, match="no room for a reply"):
        client.chat.completions.create(model="tiny", messages=too_long)


def test_64_concurrent_seeded_requests_each_get_their_own_answer(base_url, llm):
    prompts = [f"{i} + {i} =" for i in range(64)]

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        requests = [
            client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0.7,
                                      seed=i, extra_body={"ignore_eos": True})
            for i, prompt in enumerate(prompts)
        ]  # fmt: skip
        return await asyncio.wait_for(asyncio.gather(*requests), timeout=180)  # a hang fails

    results = asyncio.run(run())
    # a seeded request samples the same tokens however it is batched: here in one offline batch
    params = [SamplingParams(max_tokens=6, temperature=0.7, seed=i, ignore_eos=True)
              for i in range(64)]  # fmt: skip
    expected = [out.text for out in llm.generate(prompts, params)]
    assert [r.choices[0].text for r in results] == expected
    assert len(set(expected)) > 32  # distinct prompts and seeds: not one answer for all
    assert all(r.usage.completion_tokens == 6 for r in results)
    wait_until_idle(llm.engine)


def metric(base_url: str, name: str, **labels) -> float:
    """A sample of the server's ``/metrics`` now (0 when absent)."""
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_models_health_and_metrics(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/v1/models").json()["data"][0]["object"] == "model"
    text = httpx.get(f"{base_url}/metrics").text
    for name in (
        "jaxstack_queue_depth",
        "jaxstack_running_requests",
        "jaxstack_kv_pages_used",
        "jaxstack_generation_tokens_per_second",
        "jaxstack_time_to_first_token_seconds_bucket",
        "jaxstack_time_per_output_token_seconds_bucket",
    ):
        assert name in text
    counted = ("jaxstack_generation_tokens_total", "jaxstack_time_to_first_token_seconds_count",
               "jaxstack_time_per_output_token_seconds_count")  # fmt: skip
    before = [metric(base_url, name) for name in counted]
    lengths = metric(base_url, "jaxstack_requests_finished_total", reason="length")
    body = {"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True}
    assert httpx.post(f"{base_url}/v1/completions", json=body).status_code == 200
    after = [metric(base_url, name) for name in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [5, 1, 1]
    assert metric(base_url, "jaxstack_requests_finished_total", reason="length") == lengths + 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"prompt": "x" * 130, "max_tokens": 4},
            "131 tokens and max_tokens is 4: 135 tokens, more than the model's context of 128",
        ),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 17}, "n=17 must be in [1, 16]"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "max_token": 3}, "max_token: unknown field"),
        ({"prompt": "x", "logprobs": 21}, "logprobs=21 must be None or an int in [0, 20]"),
        ({"prompt": "x", "best_of": 2}, "best_of=2 is not supported"),
        ({"prompt": "x", "echo": True}, "echo=True is not supported"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty=2.5 must be in [-2, 2]"),
        ({"prompt": "x", "logit_bias": {"a": 5}}, "logit_bias keys must be token ids"),
        ({"prompt": "x", "logit_bias": {"999": 5}}, "[999] of logit_bias"),
        ({"prompt": "x", "min_tokens": 20}, "min_tokens=20 must be an int in [0, max_tokens]"),
        ({"prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, "x: unknown field"),
    ],
)
def test_bad_requests_get_400(base_url, body, message):
    response = httpx.post(f"{base_url}/v1/completions", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"response_format": {"type": "xml"}}, "response_format="),
        ({"top_logprobs": 2}, "top_logprobs=2 needs logprobs: true"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools="),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty=0"),
        ({"logprobs": 0}, "logprobs: Input should be a valid boolean"),  # 0 is not false
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "'image_url'"),
        ({"messages": [{"role": "user", "content": "hi", "tool_call_id": "1"}]}, "tool_call_id"),
    ],
)
def test_unsupported_chat_fields_get_400_naming_them(client, fields, message):
    options = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=1) | fields
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", **options)
    assert message in raised.value.body["message"]


def test_neutral_values_text_parts_and_stop_token_ids_are_served(client, llm):
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    options = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    neutral = dict(presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="u",
                   response_format={"type": "text"}, stream_options=None)  # fmt: skip
    as_string = client.chat.completions.create(
        messages=[{"role": "user", "content": "h\ni"}], **options
    )
    as_parts = client.chat.completions.create(
        messages=[{"role": "user", "content": parts}], **options, **neutral
    )
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content
    assert as_parts.usage == as_string.usage
    tokens = llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
    extra_body = {"ignore_eos": True, "stop_token_ids": [tokens[1]]}
    stopped = client.completions.create(prompt=PROMPT, **options | {"extra_body": extra_body})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == tokens.index(tokens[1]) + 1


def test_full_queue_gets_429_with_retry_after(base_url, llm):
    engine, fillers = llm.engine, []
    hold = EngineHold(engine)  # nothing leaves the queue meanwhile, however slow the client
    try:
        assert hold.entered.wait(timeout=30)
        with contextlib.suppress(QueueFullError):
            while True:  # requests until the queue is full
                fillers.append(engine.submit([1, 2, 3], SamplingParams(), lambda o: None))
        response = httpx.post(
            f"{base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60
        )
    finally:
        for request_id in fillers:
            engine.cancel(request_id)
        hold.release()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert "max_queue=96" in response.json()["error"]["message"]
    wait_until_idle(engine)


def test_client_disconnect_mid_stream_frees_pages(base_url, llm):
    engine = llm.engine
    wait_until_idle(engine)
    before = cancelled(engine)
    body = {"prompt": PROMPT, "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.cache.num_used > 0
    wait_until_idle(engine, timeout=10)
    assert cancelled(engine) == before + 1  # cancelled, not run to its 100 tokens


def test_client_gone_before_a_whole_answer_frees_pages(base_url, llm):
    engine = llm.engine
    wait_until_idle(engine)
    before = cancelled(engine)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True}).encode()
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:  # a client that will hang up
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 30
        while not engine.scheduler.running:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.001)
    wait_until_idle(engine, timeout=10)
    assert cancelled(engine) == before + 1  # cancelled, not run to its 100 tokens

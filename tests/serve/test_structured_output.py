"""Structured output (``response_format``) through xgrammar: constrained and free requests
share the batch, and every constrained output parses and follows its schema."""

import json

import jax
import jsonschema
import openai
import pytest
from serve_helpers import running_server

from jaxstack.serve import SamplingParams
from jaxstack.serve.server import create_app

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def client(llm):
    with running_server(create_app(llm)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_every_schema_output_parses_and_validates(client, llm):
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "pick"}], max_tokens=40,
            temperature=1.0, seed=3, n=6, response_format=FORMAT,
        )  # fmt: skip
        # constrained and free rows in one batch
        free, constrained = llm.generate(
            ["abc", "abc"],
            [SamplingParams(max_tokens=8, ignore_eos=True),
             SamplingParams(max_tokens=40, seed=1, temperature=1.0, response_format=FORMAT)],
        )  # fmt: skip
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert COMPILE_EVENT not in compiles
    texts = [c.message.content for c in reply.choices] + [constrained.text]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # sampled, not one forced answer
    plain = llm.generate(["abc"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert free.text == plain.text  # a free row is untouched by its constrained neighbour
    assert not plain.text.startswith("{")


def test_json_object_starts_an_object_and_bad_formats_are_400(client):
    extra = {"response_format": {"type": "json_object"}}
    reply = client.completions.create(
        model="tiny", prompt="x", max_tokens=12, temperature=1.0, seed=0, extra_body=extra
    )
    assert reply.choices[0].text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].text), dict)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )  # fmt: skip

"""The OpenAI surface beyond plain sampling: log-probabilities, penalties, ``logit_bias``,
``min_tokens``, ``stop_token_ids`` and ``n``, through the ``openai`` client against the real
server, checked against ``transformers`` on the same tiny checkpoint."""

import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
import transformers
from serve_helpers import running_server
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxstack import hf
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM, SamplingParams
from jaxstack.serve.sampling import BIAS_SLOTS, NO_TOKEN, LogitControls, adjust_logits
from jaxstack.serve.server import create_app

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(45)]
PROMPT = [1, 7, 20, 33, 9, 41, 12]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama (48 words) as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("openai")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    names = {"bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(names))
    config = preset("tiny", vocab_size=len(WORDS), num_layers=2, max_seq_len=64,
                    extra={"hf_model_type": "llama"})  # fmt: skip
    shapes = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), int))
    rng = np.random.default_rng(3)  # random weights without compiling init
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, np.float32)
            if "norm" in jax.tree_util.keystr(path)
            else (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        ),
        shapes["params"],
    )
    return hf.save(directory / "model", config, params, tokenizer_dir=directory)


@pytest.fixture(scope="module")
def llm(hf_dir):
    with LLM(hf=hf_dir, token_buckets=(32,), seq_buckets=(4,), progress=False) as served:
        # a first plain request: an engine over loaded (not in-memory) weights compiles its
        # step once more at its first real step (as on main, whatever the request asks)
        served.generate([PROMPT], SamplingParams(max_tokens=1))
        yield served


@pytest.fixture(scope="module")
def client(llm):
    with running_server(create_app(llm)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(hf_dir):
    """``transformers``' float32 log-softmax over the vocabulary after every token of ids."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1).numpy()

    return model, logprobs


def no_compilation(function):
    """Run ``function()`` and assert XLA compiled nothing meanwhile; returns its result."""
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = function()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert COMPILE_EVENT not in compiles
    return result


def test_completion_logprobs_equal_transformers(client, llm, reference):
    _, logprobs = reference
    ask = dict(model="m", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5,
               extra_body={"ignore_eos": True})  # fmt: skip
    done = no_compilation(lambda: client.completions.create(**ask))
    choice = done.choices[0]
    out = llm.tokenizer.encode(choice.text)
    assert len(out) == 6
    expected = logprobs(PROMPT + out)[len(PROMPT) - 1 : -1]  # [6, vocab]
    assert out == expected.argmax(-1).tolist()  # greedy
    got = choice.logprobs
    assert got.tokens == [WORDS[t] for t in out]
    np.testing.assert_allclose(got.token_logprobs, expected[np.arange(6), out], atol=1e-4)
    for row, top in zip(expected, got.top_logprobs, strict=True):
        best = np.argsort(-row)[:5]
        assert list(top) == [WORDS[t] for t in best]  # the sampled (greedy) token is the first
        np.testing.assert_allclose(list(top.values()), row[best], atol=1e-4)
    assert got.text_offset == [sum(len(WORDS[t]) for t in out[:i]) for i in range(6)]
    streamed = list(client.completions.create(**ask, stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == got.tokens
    offsets = [
        o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets == got.text_offset


def test_chat_logprobs_and_sampled_tokens(client, llm, reference):
    _, logprobs = reference
    messages = [{"role": "user", "content": "w3 w4 w5"}]
    ask = dict(model="m", messages=messages, max_tokens=5, temperature=1.0, seed=11,
               logprobs=True, top_logprobs=3)  # fmt: skip
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert reply.usage.completion_tokens == len(content) >= 1
    # the chat prompt as the server rendered it: the fallback template, "user: ..." lines
    ids = llm.tokenizer.encode("user: w3 w4 w5\nassistant: ", add_bos=False)
    out = [WORDS.index(c.token) for c in content]
    expected = logprobs(ids + out)[len(ids) - 1 : -1]
    np.testing.assert_allclose([c.logprob for c in content], expected[np.arange(len(out)), out],
                               atol=1e-4)  # fmt: skip
    for c, row in zip(content, expected, strict=True):
        assert c.bytes == list(c.token.encode())
        best = np.argsort(-row)[:3]
        assert [t.token for t in c.top_logprobs] == [WORDS[t] for t in best]
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs], row[best], atol=1e-4)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(c.token, c.logprob) for c in content]


def test_llm_reports_logprobs(llm):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=3, logprobs=2, ignore_eos=True))[0]
    assert [e.token_id for e in out.logprobs] == out.token_ids
    assert all(len(e.top) == 2 and e.top[0][0] == e.token_id for e in out.logprobs)
    assert llm.generate([PROMPT], SamplingParams(max_tokens=2))[0].logprobs is None


def reference_tokens(model, prompt, steps, *, repetition=1.0, presence=0.0, frequency=0.0,
                     bias=None) -> list[int]:  # fmt: skip
    """Greedy tokens of ``transformers``: logit bias, then its repetition-penalty processor
    over prompt + output, then frequency and presence penalties over the output."""
    ids, out = list(prompt), []
    penalty = transformers.RepetitionPenaltyLogitsProcessor(repetition)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[:, -1].float()
        for token, value in (bias or {}).items():
            logits[0, token] += value
        logits = penalty(torch.tensor([ids]), logits)[0].numpy()
        counts = np.bincount(out, minlength=logits.shape[-1])
        logits = logits - frequency * counts - presence * (counts > 0)
        ids.append(int(logits.argmax()))
        out.append(ids[-1])
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition_penalty=1.8),
        dict(frequency_penalty=1.5),
        dict(presence_penalty=-2.0),
    ],
)
def test_penalties_equal_transformers(client, reference, penalties):
    model, _ = reference
    rates = dict(repetition=penalties.get("repetition_penalty", 1.0),
                 presence=penalties.get("presence_penalty", 0.0),
                 frequency=penalties.get("frequency_penalty", 0.0))  # fmt: skip
    expected = reference_tokens(model, PROMPT, 10, **rates)
    assert expected != reference_tokens(model, PROMPT, 10)  # the penalty changes the answer
    options = {k: v for k, v in penalties.items() if k != "repetition_penalty"}
    extra = {"ignore_eos": True, "repetition_penalty": penalties.get("repetition_penalty", 1.0)}
    ask = dict(model="m", prompt=PROMPT, max_tokens=10, temperature=0, extra_body=extra)
    done = no_compilation(lambda: client.completions.create(**ask, **options))
    assert done.choices[0].text.split() == [WORDS[t] for t in expected]


def test_logit_bias_equals_transformers_and_is_clipped(client, reference):
    model, _ = reference
    plain = reference_tokens(model, PROMPT, 6)
    bias = {plain[0]: -100.0, 30: 4.0, 31: 2.5}
    expected = reference_tokens(model, PROMPT, 6, bias=bias)
    assert expected != plain
    done = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=6, temperature=0,
        logit_bias={str(k): v for k, v in bias.items()}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert done.choices[0].text.split() == [WORDS[t] for t in expected]
    assert SamplingParams(logit_bias={3: 1e9, 4: -1e9}).logit_bias == {3: 100.0, 4: -100.0}


def test_min_tokens_masks_stop_ids_until_reached(client, reference):
    model, _ = reference
    first = reference_tokens(model, PROMPT, 1)[0]
    ask = dict(model="m", prompt=PROMPT, max_tokens=8, temperature=0)
    stopped = client.completions.create(**ask, extra_body={"stop_token_ids": [first]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    extra = {"stop_token_ids": [first], "min_tokens": 3}
    late = client.completions.create(**ask, extra_body=extra)
    tokens = [WORDS.index(w) for w in late.choices[0].text.split()]
    assert len(tokens) >= 3 and first not in tokens[:3]
    expected = reference_tokens(model, PROMPT, 3, bias={first: -np.inf})
    assert tokens[:3] == expected


def test_n_choices_have_their_own_seeds_and_summed_usage(client, llm):
    ask = dict(model="m", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=40, n=3,
               extra_body={"ignore_eos": True})  # fmt: skip
    done = client.completions.create(**ask)
    expected = llm.generate([PROMPT] * 3, [SamplingParams(max_tokens=5, temperature=1.0,
                                                          seed=40 + i, ignore_eos=True)
                                           for i in range(3)])  # fmt: skip
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.text for c in done.choices] == [out.text for out in expected]
    assert len({c.text for c in done.choices}) > 1
    assert done.usage.completion_tokens == 15 and done.usage.prompt_tokens == len(PROMPT)
    chunks = list(client.completions.create(**ask, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    texts = ["", "", ""]
    for chunk in chunks[:-1]:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [out.text for out in expected]
    assert chunks[-1].usage.completion_tokens == 15
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "w1"}],
                                          max_tokens=2, n=2, temperature=0)  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy


def test_response_shapes_follow_openai(client):
    """The raw JSON keys of each answer, as OpenAI's schema names them."""
    base = str(client.base_url).rstrip("/")
    chat = {"model": "m", "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2,
            "logprobs": True, "top_logprobs": 1}  # fmt: skip
    reply = httpx.post(f"{base}/chat/completions", json=chat).json()
    assert set(reply) == {"id", "object", "created", "model", "choices", "usage"}
    assert reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    token = choice["logprobs"]["content"][0]
    assert set(token) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(token["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    body = {"model": "m", "prompt": "w1", "max_tokens": 2, "logprobs": 1}
    completion = httpx.post(f"{base}/completions", json=body).json()
    assert completion["object"] == "text_completion"
    assert set(completion["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert set(completion["choices"][0]["logprobs"]) == {
        "tokens", "token_logprobs", "top_logprobs", "text_offset"}  # fmt: skip
    assert set(completion["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_adjust_logits_equals_a_numpy_reference():
    """Three rows with different histories, settings and grammar masks in one batch (a row or
    axis mix-up, or a sign flip of the repetition penalty, changes the answer)."""
    rng = np.random.default_rng(0)
    vocab, width = 12, 8
    logits = rng.standard_normal((3, vocab)).astype(np.float32) * 3
    prompts, outputs = [[1, 2], [4], [5, 1]], [[2, 3, 3], [], [7, 7, 7, 1]]
    repetition, presence, frequency = [1.5, 1.0, 0.7], [0.3, 0.0, -0.5], [0.2, 0.0, 1.0]
    bias = {1: {4: 2.0, 9: -100.0}}
    history = np.full((3, width), NO_TOKEN, np.int32)
    bias_ids = np.full((3, BIAS_SLOTS), NO_TOKEN, np.int32)
    bias_values = np.zeros((3, BIAS_SLOTS), np.float32)
    expected = logits.astype(np.float64)
    for row in range(3):
        tokens = prompts[row] + outputs[row]
        history[row, : len(tokens)] = tokens
        for slot, (token, value) in enumerate(bias.get(row, {}).items()):
            bias_ids[row, slot], bias_values[row, slot] = token, value
            expected[row, token] += value
        seen = sorted(set(tokens))
        x = expected[row, seen]
        expected[row, seen] = np.where(x > 0, x / repetition[row], x * repetition[row])
        counts = np.bincount(outputs[row], minlength=vocab)
        expected[row] -= frequency[row] * counts + presence[row] * (counts > 0)
    allowed = np.full((3, 1), -1, np.int32)  # structured output: row 0 may take 1, 3, 5 only
    allowed[0, 0] = (1 << 1) | (1 << 3) | (1 << 5)
    expected[0, [t for t in range(vocab) if t not in (1, 3, 5)]] = -np.inf
    controls = LogitControls(
        np.full(3, -1, np.int32), bias_ids, bias_values, np.array(repetition, np.float32),
        np.array(presence, np.float32), np.array(frequency, np.float32), history,
        np.array([len(p) for p in prompts], np.int32), allowed,
    )  # fmt: skip
    got = jax.jit(adjust_logits)(logits, controls)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)

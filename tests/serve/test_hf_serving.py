"""``LLM(hf=DIR)``: a Hugging Face directory served with its tokenizer and chat template."""

import json

import jax
import jax.numpy as jnp
import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxstack import hf
from jaxstack.hf import read_eos_ids
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM, SamplingParams
from jaxstack.serve.server import create_app

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %} <|{{ m['role'] }}|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)
WORDS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS += [f"w{i}" for i in range(40)]


STOP_PROMPT = [WORDS.index(w) for w in ("w7", "w8", "w9")]


@pytest.fixture(scope="module")
def end_of_turn(tmp_path_factory):
    """A model directory whose ``generation_config.json`` lists two EOS ids, Llama-3 style:
    the tokenizer's ``</s>`` and, as the "end of turn", the token the model picks greedily
    after ``STOP_PROMPT``. Returns (directory, that token)."""
    directory = tmp_path_factory.mktemp("hf")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    config = preset("tiny", vocab_size=len(WORDS), num_layers=2, max_seq_len=64,
                    extra={"hf_model_type": "llama"})  # fmt: skip
    model = Llama(config)
    params = model.init(jax.random.PRNGKey(5), jnp.zeros((1, 4), jnp.int32))["params"]
    logits = model.apply({"params": params}, jnp.asarray([STOP_PROMPT]))
    turn_end = int(jnp.argmax(logits[0, -1]))
    assert turn_end != WORDS.index("</s>")
    eos = {"eos_token_id": [WORDS.index("</s>"), turn_end]}
    (directory / "generation_config.json").write_text(json.dumps(eos))
    hf.save(directory / "model", config, params, tokenizer_dir=directory)
    return directory / "model", turn_end


@pytest.fixture(scope="module")
def hf_llm(end_of_turn):
    llm = LLM(hf=end_of_turn[0], token_buckets=(32,), seq_buckets=(4,), progress=False)
    yield llm
    llm.close()


def test_chat_uses_the_directorys_template_and_special_tokens(hf_llm):
    assert hf_llm.chat_template == TEMPLATE and hf_llm.name == "model"
    client = TestClient(create_app(hf_llm))
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    reply = client.post("/v1/chat/completions", json=body).json()
    ids = hf_llm.tokenizer.encode("<s> <|system|> w1 w2 <|user|> w3 w4 w5 <|assistant|>")
    assert reply["usage"]["prompt_tokens"] == len(ids) == 9
    expected = hf_llm.generate([ids], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert client.get("/v1/models").json()["data"][0]["id"] == "model"


def test_every_eos_id_of_generation_config_ends_a_request(hf_llm, end_of_turn):
    directory, turn_end = end_of_turn
    assert read_eos_ids(directory) == [2, turn_end]
    assert hf_llm.engine.eos_ids == {hf_llm.tokenizer.eos_id, turn_end} == {2, turn_end}
    stopped = hf_llm.generate([STOP_PROMPT], SamplingParams(max_tokens=5))[0]
    assert stopped.token_ids == [turn_end] and stopped.finish_reason == "stop"
    full = hf_llm.generate([STOP_PROMPT], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert full.token_ids[0] == turn_end and len(full.token_ids) == 5


def test_read_eos_ids_takes_ints_and_lists_from_both_configs(tmp_path):
    assert read_eos_ids(tmp_path) == []
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert read_eos_ids(tmp_path) == [7]
    eos = {"eos_token_id": [128001, 128008, 128009, 7]}
    (tmp_path / "generation_config.json").write_text(json.dumps(eos))
    assert read_eos_ids(tmp_path) == [128001, 128008, 128009, 7]

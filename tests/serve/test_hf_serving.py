"""``LLM(hf=DIR)``: a Hugging Face directory served with its tokenizer and chat template."""

import json

import jax
import jax.numpy as jnp
import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxstack import hf
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM, SamplingParams
from jaxstack.serve.server import create_app

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %} <|{{ m['role'] }}|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} <|assistant|>{% endif %}"
)
WORDS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS += [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def hf_llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    config = preset("tiny", vocab_size=len(WORDS), num_layers=2, max_seq_len=64,
                    extra={"hf_model_type": "llama"})  # fmt: skip
    params = Llama(config).init(jax.random.PRNGKey(5), jnp.zeros((1, 4), jnp.int32))["params"]
    hf.save(directory / "model", config, params, tokenizer_dir=directory)
    llm = LLM(hf=directory / "model", token_buckets=(32,), seq_buckets=(4,), progress=False)
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

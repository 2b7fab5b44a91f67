"""``LLM(hf=DIR)``: a Hugging Face directory served with its tokenizer and chat template."""

import json
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxstack import cli, hf
from jaxstack.hf import loading, read_eos_ids
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, preset
from jaxstack.models.llama import LlamaConfig
from jaxstack.serve import LLM, SamplingParams
from jaxstack.serve.llm import load_hf_for_serving, load_run_for_serving
from jaxstack.serve.runner import serving_param_specs
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


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A 4-layer checkpoint stored in bfloat16 whose heads split 8 ways."""
    directory = tmp_path_factory.mktemp("bf16")
    config = preset("tiny", vocab_size=len(WORDS), num_layers=4, hidden_size=64, num_heads=8,
                    num_kv_heads=8, intermediate_size=256, max_seq_len=64, initializer_range=0.1,
                    extra={"hf_model_type": "llama"})  # fmt: skip
    shapes = jax.eval_shape(Llama(config).init, jax.random.PRNGKey(6), jnp.zeros((1, 4), int))
    rng = np.random.default_rng(6)  # random weights without compiling init (10 s saved)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, np.float32)
            if "norm" in jax.tree_util.keystr(path)
            else (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        ),
        shapes["params"],
    )
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, "<unk>"))
    tokenizer.save(str(directory / "tokenizer.json"))
    hf.save(directory / "model", config, params, tokenizer_dir=directory, dtype="bfloat16")
    return directory / "model"


def bytes_per_device(arrays) -> Counter:
    """Bytes each device holds of ``arrays`` (a replicated array counts on every device)."""
    held = Counter()
    for array in arrays:
        if not array.is_deleted():
            shard = math.prod(array.sharding.shard_shape(array.shape)) * array.dtype.itemsize
            for device in array.sharding.addressable_devices:
                held[device] += shard
    return held


def test_weights_load_shard_by_shard_into_the_serving_placement(bf16_dir, monkeypatch):
    mesh = make_mesh(data=1, tensor=8)
    existing = jax.live_arrays()  # held, so that no new array reuses an old one's id
    old = {id(array) for array in existing}
    peak = Counter()

    def measured(function):
        def wrapper(*args, **kwargs):
            out = function(*args, **kwargs)
            new = bytes_per_device(a for a in jax.live_arrays() if id(a) not in old)
            for device, n in new.items():
                peak[device] = max(peak[device], n)
            return out

        return wrapper

    for name in ("_put", "_astype", "_set_index"):
        monkeypatch.setattr(loading, name, measured(getattr(loading, name)))
    model, params = load_hf_for_serving(bf16_dir, "auto", mesh)
    assert model.config.dtype == "bfloat16"  # auto: the checkpoint's torch_dtype
    leaves = jax.tree.leaves(params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
    placed = bytes_per_device(leaves)
    whole = sum(leaf.nbytes for leaf in leaves)
    assert len(placed) == 8 and max(placed.values()) < whole / 3  # really sharded
    assert max(peak.values()) <= 1.2 * max(placed.values())
    specs = serving_param_specs(model, params, mesh)  # already where the engine wants them
    assert all(jax.tree.leaves(jax.tree.map(lambda leaf, spec: leaf.sharding.spec == spec,
                                            params, specs)))  # fmt: skip


def test_bfloat16_tensor_parallel_greedy_equals_float32(bf16_dir):
    prompts = [[1, 6, 9, 12, 7], [1, 30, 31, 8]]
    options = dict(token_buckets=(16,), seq_buckets=(2,), num_pages=16, page_size=4)
    greedy = SamplingParams(max_tokens=4, ignore_eos=True)
    with LLM(hf=bf16_dir, dtype="float32", progress=False, **options) as f32:
        assert f32.engine.model.config.dtype == "float32"
        expected = [out.token_ids for out in f32.generate(prompts, greedy)]
    mesh = make_mesh(data=1, tensor=4, devices=jax.devices()[:4])
    with LLM(hf=bf16_dir, mesh=mesh, progress=False, **options) as bf16:
        runner = bf16.engine.runner
        assert all(page.dtype == jnp.bfloat16 for page in runner.pages)
        assert runner.params["layers_0"]["attn"]["q"]["kernel"].dtype == jnp.bfloat16
        assert [out.token_ids for out in bf16.generate(prompts, greedy)] == expected


def test_run_checkpoint_loads_into_the_serving_placement(bf16_dir, tmp_path):
    config = hf.convert_to_checkpoint(bf16_dir, tmp_path / "run")  # float32 in the checkpoint
    mesh = make_mesh(data=1, tensor=8)
    model, params = load_run_for_serving(tmp_path / "run", config, "auto", mesh)
    assert model.config.dtype == "float32"  # auto on CPU: the run's compute dtype
    _, bf16 = load_run_for_serving(tmp_path / "run", config, "bfloat16", mesh)
    _, expected = load_hf_for_serving(bf16_dir, "bfloat16", mesh)
    for got, want in zip(jax.tree.leaves(bf16), jax.tree.leaves(expected), strict=True):
        assert got.dtype == jnp.bfloat16 and got.sharding == want.sharding
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_dry_run_plans_a_1b_model_over_8_devices(tmp_path, capsys):
    """Llama-3.2-1B's shape (1,235,814,400 parameters, tied head) from its config alone."""
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                         num_kv_heads=8, intermediate_size=8192, max_seq_len=2048,
                         tie_embeddings=True, extra={"hf_model_type": "llama"})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(config, "bfloat16")))
    command = ["serve", "--hf", str(tmp_path), "--tensor", "8", "--dry-run"]
    assert cli.main([*command, "--num-pages", "1024"]) == 0
    out = capsys.readouterr().out
    mib = {m[0]: float(m[1]) for m in re.findall(r"(\w[\w ]*?) +([\d.]+) MiB", out)}
    assert "tensor=8, bfloat16" in out  # auto: the checkpoint's torch_dtype
    assert mib["whole model"] == round(1_235_814_400 * 2 / 2**20, 1)
    assert mib["whole model"] / 8 <= mib["weights"] < mib["whole model"] / 8 + 1  # norms copied
    # 16 layers x 1024 pages x 16 slots x (2 x 8 KV heads / 8 devices) x 64 dims x 2 bytes
    assert mib["KV cache"] == 64.0 and "(16384 token slots)" in out
    # without --num-pages: at most every sequence (64) at the full context (2048 tokens)
    assert cli.main(command) == 0
    assert "(131072 token slots)" in capsys.readouterr().out


def test_unknown_dtype_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="dtype='int8'; choose one of auto, bfloat16"):
        LLM(hf=tmp_path, dtype="int8")  # an empty directory: the dtype is checked first

"""Attention sinks (StreamingLLM) through the serving engine: past the sliding window, the
engine's greedy tokens equal a dense full-sequence reference with the same window + sinks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from jaxstack import cli, hf
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM, SamplingParams

WINDOW, SINKS, NEW_TOKENS, LENGTH = 8, 4, 20, 32
PROMPTS = [[1, 70, 33, 120, 9, 41], [200, 5, 17]]
OPTIONS = dict(page_size=4, num_pages=32, token_buckets=(16,), seq_buckets=(2,), progress=False)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A 2-layer model with an 8-token sliding window saved as a Hugging Face Mistral
    directory, its params, and a dense greedy decoder: every step reruns the whole sequence
    (padded to ``LENGTH``, one compile) through the model's non-paged attention, window and
    sinks masked there."""
    config = preset("tiny", num_layers=2, hidden_size=64, intermediate_size=128,
                    sliding_window=WINDOW, max_seq_len=64,
                    extra={"hf_model_type": "mistral"})  # fmt: skip
    model = Llama(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(3)  # random weights without compiling init
    params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32),
                          shapes["params"])  # fmt: skip

    def greedy(sinks: int) -> list[list[int]]:
        dense = Llama(dataclasses.replace(config, attention_sinks=sinks))
        forward = jax.jit(lambda ids: dense.apply({"params": params}, ids))
        outputs = []
        for prompt in PROMPTS:
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                padded = np.zeros((1, LENGTH), np.int32)  # causal: the padding is never seen
                padded[0, : len(ids)] = ids
                ids.append(int(jnp.argmax(forward(padded)[0, len(ids) - 1])))
            outputs.append(ids[len(prompt) :])
        return outputs

    directory = tmp_path_factory.mktemp("windowed")
    words = {f"w{i}": i for i in range(config.vocab_size)}
    Tokenizer(models.WordLevel(words, "w0")).save(str(directory / "tokenizer.json"))
    hf.save(directory / "mistral", config, params, tokenizer_dir=directory)
    full = dataclasses.replace(config, sliding_window=None, extra={"hf_model_type": "llama"})
    hf.save(directory / "llama", full, params, tokenizer_dir=directory)
    return directory, params, greedy


def test_generation_past_the_window_matches_the_dense_reference_with_sinks(windowed):
    directory, _, greedy = windowed
    expected = greedy(SINKS)
    assert expected != greedy(0)  # the sinks change these answers: the check can fail
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(hf=directory / "mistral", attention_sinks=SINKS, **OPTIONS) as llm:
        assert llm.engine.model.config.attention_sinks == SINKS
        assert [out.token_ids for out in llm.generate(PROMPTS, sampling)] == expected


def test_sinks_without_a_sliding_window_are_refused(windowed, capsys):
    directory, params, _ = windowed
    message = "attention_sinks=4 needs a model with a sliding window"
    full = directory / "llama"
    assert cli.main(["serve", "--hf", str(full), "--attention-sinks", "4"]) == 2
    assert message in capsys.readouterr().err  # before any weight is read
    model = Llama(hf.load_config(full))
    with pytest.raises(ValueError, match=message):
        LLM(model, params, attention_sinks=4, **OPTIONS)
    with pytest.raises(ValueError, match="attention_sinks=2 needs a model with a sliding_window"):
        dataclasses.replace(model.config, attention_sinks=2)
    sinks = dataclasses.replace(hf.load_config(directory / "mistral"), attention_sinks=4)
    with pytest.raises(ValueError, match="attention_sinks=4 cannot be written as HF"):
        hf.config_to_hf(sinks, "float32")  # no HF family has sinks: an export would drop them

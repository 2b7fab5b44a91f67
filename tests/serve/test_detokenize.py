"""Outputs are decoded after their prompt: SentencePiece-style tokenizers keep the first
token's leading space (``decode_continuation``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxstack.data import ByteTokenizer
from jaxstack.data.tokenizers import HFTokenizer, decode_continuation
from jaxstack.models import Llama, preset
from jaxstack.serve import LLM, SamplingParams

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "hello world, the world is big"]


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory) -> HFTokenizer:
    """A BPE tokenizer with Llama 2's Metaspace pre-tokenizer and decoder ("\u2581the"),
    trained here on three sentences."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    path = tmp_path_factory.mktemp("metaspace") / "tokenizer.json"
    tokenizer.save(str(path))
    return HFTokenizer(path)


def test_continuation_keeps_the_leading_space(metaspace):
    prompt, new = metaspace.encode("hello", add_bos=True), metaspace.encode("world the cat")
    assert metaspace.decode(new) == "world the cat"  # alone, the space is lost
    assert decode_continuation(metaspace, prompt, new) == " world the cat"
    assert decode_continuation(metaspace, [], new) == "world the cat"
    assert decode_continuation(metaspace, prompt, []) == ""


def test_a_character_the_context_left_unfinished_is_new_text():
    byte = ByteTokenizer()
    e_acute = byte.encode("é")  # two bytes: the prompt ends with the first
    assert decode_continuation(byte, [*byte.encode("caf"), e_acute[0]], e_acute[1:]) == "é"


def test_engine_outputs_are_decoded_after_their_prompt(metaspace):
    config = preset("tiny", vocab_size=metaspace.vocab_size, num_layers=1, hidden_size=32,
                    num_heads=2, num_kv_heads=1, intermediate_size=64, max_seq_len=64)  # fmt: skip
    model = Llama(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)  # random weights without compiling init
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes["params"])
    # the head scores only word-initial tokens ("▁cat"), so that outputs start with a space
    vocab = Tokenizer.from_file(str(metaspace.path)).get_vocab()
    word_start = np.zeros(metaspace.vocab_size, np.float32)
    word_start[[i for piece, i in vocab.items() if piece.startswith("▁")]] = 1
    params["lm_head"]["kernel"] *= word_start
    prompts = ["the cat sat", "hello world", "a dog"]
    options = dict(page_size=4, num_pages=16, token_buckets=(16,), seq_buckets=(4,))
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    with LLM(model, params, tokenizer=metaspace, progress=False, **options) as llm:
        outputs = llm.generate(prompts, greedy)
        for prompt, out in zip(prompts, outputs, strict=True):
            ids = llm.encode(prompt)
            whole, before = metaspace.decode(ids + out.token_ids), metaspace.decode(ids)
            assert whole.startswith(before) and out.text == whole[len(before) :]
        assert any(out.text.startswith(" ") for out in outputs)  # what decode(output) drops
        # a stop string at a later word's space: the cut keeps the fewest tokens covering it
        index, out = next((i, o) for i, o in enumerate(outputs) if " " in o.text[1:])
        stop = out.text[out.text.index(" ", 1) :]
        sampling = SamplingParams(max_tokens=6, ignore_eos=True, stop=[stop])
        cut = llm.generate(prompts[index], sampling)[0]
    assert cut.finish_reason == "stop" and cut.text == out.text[: out.text.index(" ", 1)]
    ids, kept = llm.encode(prompts[index]), len(cut.token_ids)
    assert cut.token_ids == out.token_ids[:kept] and kept >= 1
    assert decode_continuation(metaspace, ids, out.token_ids[:kept]).startswith(cut.text)
    assert not decode_continuation(metaspace, ids, out.token_ids[: kept - 1]).startswith(cut.text)

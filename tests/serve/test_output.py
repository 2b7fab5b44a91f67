"""The output processor: incremental detokenization equals a full decode, stop strings
across token boundaries, and host work per token that does not grow with the output."""

from jaxstack.data import ByteTokenizer
from jaxstack.serve import SamplingParams
from jaxstack.serve.output import REPLACEMENT, OutputProcessor

TEXT = "naïve café — 日本語 🎉 ok"  # 2-, 3- and 4-byte characters split over byte tokens
EOS = ByteTokenizer.eos_id


class CountingTokenizer(ByteTokenizer):
    """Counts the token ids it decodes (the detokenizer's work)."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return super().decode(ids)


def feed(tokens, params, prompt=(104, 105), tokenizer=None):
    processor = OutputProcessor(
        "r", list(prompt), params, tokenizer or ByteTokenizer(), frozenset({EOS}), 10**6
    )
    outputs = []
    for token in tokens:
        outputs.append(processor.add_token(token))
        if outputs[-1].finished:
            break
    return processor, outputs


def test_incremental_detokenization_equals_full_decode():
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode(TEXT) * 3
    for prompt in ([104, 105], [0xE6, 0x97]):  # the second ends mid-character
        _, outputs = feed(tokens, SamplingParams(max_tokens=len(tokens)), prompt)
        assert [o.finished for o in outputs] == [False] * (len(tokens) - 1) + [True]
        assert "".join(o.delta for o in outputs) == tokenizer.decode(tokens)
        assert all(REPLACEMENT not in o.delta for o in outputs)
        assert outputs[-1].text == tokenizer.decode(tokens)
        assert outputs[-1].token_ids == tokens and outputs[-1].finish_reason == "length"
        # each report reads the history as it was then
        assert outputs[3].token_ids == tokens[:4] and outputs[3].new_token_ids == tokens[3:4]


def test_a_character_the_prompt_leaves_incomplete_is_completed_by_the_output():
    """The prompt ends with two of the three bytes of 日; the first output token completes it:
    the output's text holds the whole character, as decoding prompt + output and dropping the
    prompt's complete text gives."""
    _, outputs = feed([0xA5, 105], SamplingParams(max_tokens=2), prompt=[104, 0xE6, 0x97])
    assert "".join(o.delta for o in outputs) == "日i"
    assert outputs[-1].text == "日i"


def test_a_truncated_character_is_flushed_at_the_end():
    tokens = ByteTokenizer().encode("ab日")[:-1]  # the last character lacks its last byte
    _, outputs = feed(tokens, SamplingParams(max_tokens=len(tokens)))
    assert "".join(o.delta for o in outputs) == ByteTokenizer().decode(tokens)  # "ab\ufffd"


def test_stop_string_across_token_boundaries():
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode(TEXT)
    stop = "語 🎉"  # four characters over eight byte tokens
    params = SamplingParams(max_tokens=100, stop=("zzz", stop))
    processor, outputs = feed(tokens, params)
    final = outputs[-1]
    kept = TEXT[: TEXT.index(stop)]
    assert final.finished and final.finish_reason == "stop"
    assert final.text == kept and "".join(o.delta for o in outputs) == kept
    assert final.token_ids == tokenizer.encode(kept)  # completion tokens end at the cut
    assert len(outputs) < len(tokens)  # it stopped as the stop string completed
    # nothing that could start a stop string was shown before it was ruled out
    shown = ""
    for out in outputs[:-1]:
        shown += out.delta
        assert len(shown) <= max(0, len(out.text) - (len(stop) - 1))


def test_stop_token_and_eos_end_the_output_with_the_token():
    tokens = ByteTokenizer().encode("abc")
    _, outputs = feed([*tokens, EOS, 100], SamplingParams(max_tokens=10))
    assert len(outputs) == 4 and outputs[3].finished and outputs[3].token_ids == [*tokens, EOS]
    assert outputs[3].text == "abc"
    _, outputs = feed(tokens, SamplingParams(max_tokens=10, stop_token_ids=(tokens[1],)))
    assert outputs[1].finish_reason == "stop" and outputs[1].token_ids == tokens[:2]


def test_host_work_per_token_stays_flat_as_the_output_grows():
    tokenizer = CountingTokenizer()
    tokens = tokenizer.encode(TEXT) * 100  # 2,900 tokens
    params = SamplingParams(max_tokens=len(tokens), stop=("never", "seen here"))
    processor = OutputProcessor("r", [104], params, tokenizer, frozenset({EOS}), 10**6)
    work = []
    for token in tokens:
        before = tokenizer.decoded
        out = processor.add_token(token)
        work.append(tokenizer.decoded - before + len(out.new_token_ids) + len(out.delta))
    early, late = sum(work[10:210]), sum(work[-200:])
    assert late <= 2 * early, (early, late)
    assert out.text == tokenizer.decode(tokens)

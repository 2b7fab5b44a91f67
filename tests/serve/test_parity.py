"""``js.LLM(hf=DIR)`` greedy outputs against ``transformers``' ``generate`` on a tiny random
Llama that transformers saved: equal in float32; in bfloat16, every token the float32
reference's best or within bfloat16's rounding of it."""

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models

from jaxstack.serve import LLM, SamplingParams

VOCAB, NEW_TOKENS = 128, 12
PROMPTS = [[1, 5, 17, 99, 3], [1, *range(20, 60, 2)]]  # the second is prefilled in two chunks
OPTIONS = dict(page_size=4, num_pages=64, token_buckets=(16,), seq_buckets=(4,), progress=False)
BF16_TOLERANCE = 1.5
"""How far (in logits, which are O(10) here) bfloat16 serving may be from float32: well above
the largest difference between transformers' own bfloat16 and float32 logits on this model
(0.6)."""


def save_llama(directory, dtype: torch.dtype) -> torch.nn.Module:
    """A random 2-layer GQA Llama saved by transformers in ``dtype`` with a word-level
    tokenizer; returns it reloaded in float32 (the reference), generating exactly
    ``max_new_tokens``."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norm scales away from their ones
            if param.ndim > 1:
                param.normal_(0.0, 0.2)
            else:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
        model.lm_head.weight.normal_(0.0, 1.0)  # logits O(10): clear greedy choices
    model.to(dtype).save_pretrained(directory)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    Tokenizer(models.WordLevel(words, "<unk>")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    reference = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    reference.generation_config.eos_token_id = None
    return reference.eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_outputs_equal_transformers_generate(tmp_path, dtype):
    reference = save_llama(tmp_path, getattr(torch, dtype))
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(hf=tmp_path, **OPTIONS) as llm:  # dtype auto: the checkpoint's
        assert llm.engine.model.config.dtype == dtype
        outputs = llm.generate(PROMPTS, greedy)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                          do_sample=False)[0, len(prompt) :].tolist()  # fmt: skip
            # the reference's logits at every step of our answer
            answer = torch.tensor([prompt + out.token_ids])
            logits = reference(answer).logits[0, len(prompt) - 1 : -1]
        if dtype == "float32":
            assert out.token_ids == expected
            continue
        # bfloat16 may pick another token where float32's top two are closer than its
        # rounding; every token it picks is within that of the best, and the answers agree
        # up to the first such close call
        best = logits.max(-1).values
        chosen = logits[torch.arange(NEW_TOKENS), out.token_ids]
        assert (best - chosen <= BF16_TOLERANCE).all(), (prompt, best - chosen)
        top2 = logits.topk(2).values
        close = torch.nonzero(top2[:, 0] - top2[:, 1] <= BF16_TOLERANCE)
        agree = int(close[0, 0]) if len(close) else NEW_TOKENS
        assert out.token_ids[:agree] == expected[:agree]

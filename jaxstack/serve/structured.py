"""Structured output: ``response_format`` grammars compiled by ``xgrammar`` (vLLM's default
backend) into per-request matchers, whose token bitmasks the compiled step applies to the
logits, so constrained and free requests share a batch.

``xgrammar`` comes with the ``structured`` extra (``pip install "jaxstack[structured]"``); it
is imported on the first request that asks for a format.
"""

import json
from typing import Any

from jaxstack.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError(
            'response_format needs the structured extra: pip install "jaxstack[structured]"'
        ) from None
    return xgrammar


def bitmask_width(vocab_size: int) -> int:
    """32-bit words of one row's token bitmask (bit ``t % 32`` of word ``t // 32``)."""
    return (vocab_size + 31) // 32


def check_format(response_format: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``response_format`` is OpenAI's ``{"type": "json_object"}``
    or ``{"type": "json_schema", "json_schema": {"schema": {...}, ...}}``."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError(
            f"response_format={response_format!r} must be {{'type': 'json_object'}} or "
            "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
        )


class Grammars:
    """Compiles ``response_format``s for one tokenizer and vocabulary into matchers (its
    ``xgrammar.GrammarCompiler`` caches compiled grammars)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self._tokenizer, self._vocab_size, self._eos = tokenizer, vocab_size, sorted(eos_ids)
        self._compiler = None

    def matcher(self, response_format: dict[str, Any]):
        """A fresh ``xgrammar.GrammarMatcher`` for ``response_format`` (``check_format``'s
        shapes); raises ``ValueError`` for a schema xgrammar cannot compile."""
        xgr = _xgrammar()
        if self._compiler is None:
            self._compiler = xgr.GrammarCompiler(self._tokenizer_info(xgr))
        try:
            if response_format["type"] == "json_object":
                grammar = self._compiler.compile_builtin_json_grammar()
            else:
                schema = json.dumps(response_format["json_schema"]["schema"])
                grammar = self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as error:  # xgrammar raises RuntimeError on a bad schema
            raise ValueError(f"response_format: the schema does not compile: {error}") from None
        return xgr.GrammarMatcher(grammar)

    def _tokenizer_info(self, xgr):
        tok, size = self._tokenizer, self._vocab_size
        if isinstance(tok, ByteTokenizer):
            vocab: list[bytes | str] = [bytes([i]) for i in range(256)]
            vocab += [f"<special_{i}>" for i in range(256, tok.vocab_size)]
            return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=size,
                                     stop_token_ids=self._eos)  # fmt: skip
        if isinstance(tok, HFTokenizer):
            from transformers import PreTrainedTokenizerFast

            fast = PreTrainedTokenizerFast(tokenizer_object=tok._tok)
            return xgr.TokenizerInfo.from_huggingface(fast, vocab_size=size,
                                                      stop_token_ids=self._eos)  # fmt: skip
        raise ValueError(f"response_format is not supported with a {type(tok).__name__}")

"""The output processor: incremental detokenization, stop strings and finish reasons, with
host work per new token independent of how long the output already is.

Detokenization follows the usual incremental scheme: each request keeps a window of recent
token ids; a new token's text is ``decode(window + token)`` minus ``decode(window)``, so a
character split across several tokens (a multi-byte UTF-8 character in byte-level
vocabularies) appears once its last token arrives, and tokenizers whose pieces depend on their
neighbours (SentencePiece's leading spaces) see a few tokens of context, the prompt's last
tokens included. Stop strings are searched only in the new text plus the
``longest stop - 1`` characters before it. ``RequestOutput`` shares the request's growing
token and text history instead of copying it per token.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from jaxstack.data.tokenizers import Tokenizer
from jaxstack.serve.sampling import SamplingParams, TokenLogprob

CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the output as context (leading spaces, merges)."""
MAX_PENDING_TOKENS = 8
"""Tokens that may wait for a character to complete; past that the replacement character
is emitted (invalid bytes never complete, and the window must stay small)."""
REPLACEMENT = "\ufffd"


class History:
    """A request's output so far, shared by every ``RequestOutput`` reported for it: each
    output reads the prefix that existed when it was made (copied only when read). Tokens
    and text past a stop string stay here; the outputs' counts end before them."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None  # one per token, when asked for
        self._chunks: list[str] = []
        self._text = ""  # the chunks joined, cached
        self._joined = 0  # chunks in _text

    def add_text(self, text: str) -> None:
        if text:
            self._chunks.append(text)

    def text(self) -> str:
        """All the text so far (joined once per change, when read)."""
        if self._joined != len(self._chunks):
            self._text += "".join(self._chunks[self._joined :])
            self._joined = len(self._chunks)
        return self._text


@dataclass
class RequestOutput:
    """A request's state as reported to its caller after each new token and at the end.

    ``new_token_ids`` and ``delta`` are what is new since the previous report; ``token_ids``
    and ``text`` read the request's history as it was at this report (built when read, so a
    caller that streams deltas never pays for the whole history).
    """

    request_id: str
    prompt_token_ids: list[int]
    """The prompt (the engine's own list: do not modify)."""
    new_token_ids: list[int]
    """Tokens since the previous report."""
    delta: str = ""
    """Text since the previous report (held back while it may become a stop string)."""
    finished: bool = False
    finish_reason: str | None = None
    """``stop`` (EOS, a stop token or string), ``length``, ``cancelled`` or ``error``."""
    error: str | None = None
    _history: History = field(default_factory=History, repr=False, compare=False)
    _num_tokens: int = field(default=0, repr=False, compare=False)
    _num_chars: int = field(default=0, repr=False, compare=False)

    @property
    def token_ids(self) -> list[int]:
        """Every output token so far (a stop token included; at a stop string, the tokens
        before it)."""
        return self._history.tokens[: self._num_tokens]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One per ``token_ids`` entry when the request asked (``SamplingParams.logprobs``)."""
        logprobs = self._history.logprobs
        return None if logprobs is None else logprobs[: self._num_tokens]

    @property
    def text(self) -> str:
        """Decoded output so far (ends before a stop string); empty without a tokenizer."""
        return self._history.text()[: self._num_chars]


class Detokenizer:
    """Incremental decoding of one request's output tokens (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int]):
        self.tokenizer = tokenizer
        context = list(prompt[-CONTEXT_TOKENS:])
        read = len(context)
        while read and tokenizer.decode(context[:read]).endswith(REPLACEMENT):
            read -= 1  # a character the prompt leaves incomplete: the output completes it
        if read == 0:  # nothing complete to anchor on: decode the output alone
            context = []
        self._window = context
        self._read = read  # window tokens already turned into text

    def add(self, token: int) -> str:
        """The text ``token`` completes (empty while a character is still incomplete)."""
        self._window.append(token)
        if len(self._window) - self._read > MAX_PENDING_TOKENS:
            return self.flush()
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever the pending tokens decode to, incomplete characters as U+FFFD."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self._window[: self._read])
        text = self.tokenizer.decode(self._window)
        if text.endswith(REPLACEMENT) and not final:
            return ""
        del self._window[:-CONTEXT_TOKENS]  # what was decoded stays as context
        self._read = len(self._window)
        return text[len(before) :]


class OutputProcessor:
    """One request's reports: appends each new token, decodes it, finds stops and the finish
    reason, and builds the ``RequestOutput`` (``tokenizer`` None: token ids only)."""

    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer | None,
        eos_ids: frozenset[int],
        max_model_len: int,
    ):
        self.request_id, self.prompt, self.params = request_id, prompt, params
        self.history = History()
        if params.logprobs is not None:
            self.history.logprobs = []
        self._detok = Detokenizer(tokenizer, prompt) if tokenizer is not None else None
        self._stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self._token_limit = min(params.max_tokens, max_model_len - len(prompt))
        self._hold = max((len(s) - 1 for s in params.stop), default=0)
        self._text_len = 0  # characters decoded
        self._ends: list[int] = []  # characters decoded after each token
        self._sent_chars = self._sent_tokens = 0
        self._kept_tokens: int | None = None  # output tokens before a stop string's cut
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        """Output tokens kept (those past a stop string's cut are dropped)."""
        if self._kept_tokens is not None:
            return self._kept_tokens
        return len(self.history.tokens)

    def add_token(self, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        """Record the next output token (and its ``logprob`` when the request asked);
        returns the report (finished at a stop or the limit)."""
        history = self.history
        history.tokens.append(token)
        if history.logprobs is not None:
            history.logprobs.append(logprob)
        reason = None
        if token in self._stop_ids:
            reason = "stop"
        elif len(history.tokens) >= self._token_limit:
            reason = "length"
        if self._detok is not None:
            new = self._detok.add(token)
            if reason is not None:
                new += self._detok.flush()
            if self._add_text(new):
                reason = "stop"
        return self.report(reason)

    def _add_text(self, new: str) -> bool:
        """Append decoded text; True if it completed a stop string (the text and tokens are
        then cut before it)."""
        start = self._text_len
        self.history.add_text(new)
        self._text_len += len(new)
        self._ends.append(self._text_len)
        if not new or not self.params.stop or len(self.history.tokens) < self.params.min_tokens:
            return False
        # only a stop string ending in the new text can be new
        offset = max(0, start - self._hold)
        tail = self.history.text()[offset:]
        found = [i for s in self.params.stop if (i := tail.find(s)) >= 0]
        if not found:
            return False
        cut = offset + min(found)
        self._text_len = cut
        # the fewest tokens whose text reaches the cut
        self._kept_tokens = bisect.bisect_left(self._ends, cut) + 1 if cut > 0 else 0
        return True

    def report(self, reason: str | None, error: str | None = None) -> RequestOutput:
        """The report of what is new since the last one; ``reason`` finishes the request."""
        history, finished = self.history, reason is not None
        visible = self._text_len if finished else self._text_len - self._hold
        delta = ""
        if visible > self._sent_chars:
            text = history.text()
            delta = text[self._sent_chars : visible]
            if not finished:  # an incomplete character is never shown mid-stream
                delta = delta.rstrip(REPLACEMENT)
            self._sent_chars += len(delta)
        num_tokens = self.num_tokens
        new_tokens = history.tokens[self._sent_tokens : num_tokens]
        self._sent_tokens = max(self._sent_tokens, num_tokens)
        self.finish_reason = reason
        return RequestOutput(
            self.request_id,
            self.prompt,
            new_tokens,
            delta,
            finished,
            reason,
            error,
            history,
            num_tokens,
            self._text_len,
        )

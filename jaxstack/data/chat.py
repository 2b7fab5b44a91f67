"""Instruction and chat data: JSONL records -> packed examples with loss on answers only.

Record formats (one JSON object per line):

- ``text``: ``{"text": ...}``: plain language modelling (:class:`~jaxstack.data.PackedDataset`).
- ``prompt_response``: ``{"prompt": ..., "response": ...}``: BOS (when the tokenizer has one)
  + prompt + response; the loss covers the response tokens and the EOS that ends it.
- ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}]}``
  rendered with the model's chat template (``chat_template`` of ``tokenizer_config.json`` or
  ``chat_template.jinja`` beside the tokenizer; :data:`FALLBACK_CHAT_TEMPLATE` when there is
  none); the loss covers the assistant turns (their text and whatever the template closes
  a turn with, e.g. ``<|eot_id|>``) and the EOS that ends the conversation.

Each record is one document: its tokens, then the EOS id; documents are packed back to back
into rows of ``seq_len + 1`` tokens as plain text is, each row attending only within its
documents (``segment_ids`` and ``positions`` come from explicit document boundaries, so an
EOS token inside a chat template does not split a conversation).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxstack.data.packing import check_seq_len, positions
from jaxstack.data.text import PathsLike, iter_jsonl
from jaxstack.data.tokenizers import Tokenizer

FORMATS = ("auto", "text", "prompt_response", "chat")
"""``DataConfig.format`` values; ``auto`` picks from the first record's fields."""

ROLES = ("system", "user", "assistant")

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
"""Used when the model directory has no chat template: ``role: content`` lines, and
``assistant: `` to prompt an answer."""


def read_chat_template(directory: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """The chat template of a Hugging Face directory (``chat_template`` of
    ``tokenizer_config.json``, else ``chat_template.jinja``; None if neither) and the
    ``bos_token`` / ``eos_token`` strings its config names (what templates refer to)."""
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = Path(directory) / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    tokens = {}
    for key in ("bos_token", "eos_token"):
        entry = config.get(key)
        if isinstance(entry, dict):
            entry = entry.get("content")
        if isinstance(entry, str):
            tokens[key] = entry
    return template, tokens


class ChatTemplate:
    """A Jinja chat template (Hugging Face conventions: ``messages``,
    ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``), rendered
    in a sandbox; ``None`` uses :data:`FALLBACK_CHAT_TEMPLATE`."""

    def __init__(self, template: str | None = None, tokens: dict[str, str] | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self.source = template or FALLBACK_CHAT_TEMPLATE
        self._template = env.from_string(self.source)
        self._tokens = {"bos_token": "", "eos_token": "", **(tokens or {})}

    @classmethod
    def of(cls, directory: str | os.PathLike) -> ChatTemplate:
        """The template of a model directory (:func:`read_chat_template`), or the fallback."""
        return cls(*read_chat_template(directory))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (``add_generation_prompt``: ending where an answer starts).

        Raises:
            ValueError: the template rejected the messages.
        """
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self._tokens
        )

    def answer_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the ``[start, end)`` character span of each
        assistant turn in it: from where the prompt for that turn ends to where the text
        rendered up to and including the turn ends (its end-of-turn marker included).

        Raises:
            ValueError: the template does not render a conversation as an extension of its
                beginning (then no span can be cut out of it).
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError(
                    f"the chat template does not render message {i} as an extension of the "
                    "messages before it, so assistant turns cannot be located"
                )
            spans.append((len(before), len(through)))
        return text, spans


def _raise_template_error(message: str):
    raise ValueError(message)


def detect_format(paths: PathsLike) -> str:
    """``chat`` when the first record has ``messages``, ``prompt_response`` when it has
    ``prompt`` and ``response``, else ``text``."""
    for _, record in iter_jsonl(paths):
        if "messages" in record:
            return "chat"
        if "prompt" in record and "response" in record:
            return "prompt_response"
        return "text"
    return "text"


def prompt_response_document(
    record: dict, where: str, tokenizer: Tokenizer
) -> tuple[list[int], list[float]]:
    """Token ids and loss weights (1 on response tokens) of a ``{"prompt", "response"}``
    record; ``where`` (``file:line``) names it in errors."""
    for name in ("prompt", "response"):
        if not isinstance(record.get(name), str):
            raise ValueError(
                f"{where}: field {name!r} must be a string (found {_found(record, name)}); "
                'prompt_response records look like {"prompt": "...", "response": "..."}'
            )
    prompt = tokenizer.encode(record["prompt"], add_bos=tokenizer.bos_id is not None)
    response = tokenizer.encode(record["response"])
    return prompt + response, [0.0] * len(prompt) + [1.0] * len(response)


def chat_document(
    record: dict, where: str, tokenizer: Tokenizer, template: ChatTemplate
) -> tuple[list[int], list[float]]:
    """Token ids and loss weights (1 on assistant turns) of a ``{"messages": [...]}`` record,
    rendered with ``template``; the text between turns and each turn are tokenized as
    separate pieces, so a weight never straddles a token."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"{where}: field 'messages' must be a non-empty list (found "
            f"{_found(record, 'messages')}); chat records look like "
            '{"messages": [{"role": "user", "content": "..."}, ...]}'
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise ValueError(
                f"{where}: messages[{i}] has role {role!r}; each message needs a role of "
                f"{', '.join(ROLES)} and a string content"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message: nothing to train on")
    try:
        text, spans = template.answer_spans(messages)
    except Exception as error:  # a template's own checks raise anything
        raise ValueError(f"{where}: the chat template failed: {error}") from None
    ids: list[int] = []
    weights: list[float] = []
    cut = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, weight in ((text[cut:start], 0.0), (text[start:end], 1.0)):
            if piece:
                piece_ids = tokenizer.encode(piece)
                ids += piece_ids
                weights += [weight] * len(piece_ids)
        cut = end
    return ids, weights


def _found(record: dict, name: str) -> str:
    if name in record:
        return type(record[name]).__name__
    return f"no such field; fields {sorted(record)}"


class WeightedPackedDataset:
    """Packed examples of documents that carry a loss weight per token (see the module doc).

    Example ``i`` is tokens ``[i * (L + 1), (i + 1) * (L + 1))`` of the stream: ``input_ids``,
    ``targets``, ``segment_ids``, ``positions`` (``[L] int32``) and ``loss_mask`` (``[L]
    float32``: the target's weight, 0 where the target starts another document).

    Args:
        documents: ``(token ids, weights)`` per document, without the EOS (appended here,
            with weight 1: the model learns to stop).
        seq_len: ``L``.
        eos_id: the end-of-document id.

    Raises:
        ValueError: fewer than ``L + 1`` tokens in all.
    """

    def __init__(
        self, documents: Sequence[tuple[list[int], list[float]]], *, seq_len: int, eos_id: int
    ):
        check_seq_len(seq_len)
        ids, weights, docs = [], [], []
        for index, (doc_ids, doc_weights) in enumerate(documents):
            ids += [*doc_ids, eos_id]
            weights += [*doc_weights, 1.0]
            docs += [index] * (len(doc_ids) + 1)
        if len(ids) < seq_len + 1:
            raise ValueError(
                f"the records hold {len(ids)} tokens (one eos per record included) but "
                f"seq_len={seq_len} needs at least {seq_len + 1}; add records or lower seq_len"
            )
        self.tokens = np.asarray(ids, np.int32)
        self.weights = np.asarray(weights, np.float32)
        self.documents = np.asarray(docs, np.int32)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.tokens.size // (self.seq_len + 1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example index {index} out of range for {len(self)} examples")
        width = self.seq_len + 1
        window = slice(i % len(self) * width, (i % len(self) + 1) * width)
        row, docs = self.tokens[window], self.documents[window]
        seg = (docs - docs[0] + 1).astype(np.int32)
        return {
            "input_ids": row[:-1],
            "targets": row[1:],
            "segment_ids": seg[:-1],
            "positions": positions(seg)[:-1],
            "loss_mask": self.weights[window][1:] * (seg[1:] == seg[:-1]),
        }

    @classmethod
    def from_jsonl(
        cls,
        paths: PathsLike,
        data_format: str,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        eos_id: int,
        template: ChatTemplate | None = None,
    ) -> WeightedPackedDataset:
        """Read ``prompt_response`` or ``chat`` records (``template``: default the fallback).

        Raises:
            ValueError: a bad record, naming its file, line and field.
        """
        if data_format not in ("prompt_response", "chat"):
            raise ValueError(f"data_format={data_format!r}; choose prompt_response or chat")
        template = template or ChatTemplate()
        documents = [
            chat_document(record, where, tokenizer, template)
            if data_format == "chat"
            else prompt_response_document(record, where, tokenizer)
            for where, record in iter_jsonl(paths)
        ]
        return cls(documents, seq_len=seq_len, eos_id=eos_id)

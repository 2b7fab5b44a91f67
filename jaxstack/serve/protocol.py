"""The request bodies of the OpenAI-compatible routes, as pydantic models.

A field this server does not implement is refused with a 400 that names it, never ignored:
an unknown name is rejected by ``extra="forbid"``, and an OpenAI field listed in
``UNSUPPORTED`` is accepted only at its neutral value (the one that asks for nothing, such
as ``presence_penalty: 0`` or ``logprobs: false``, which some clients always send).
"""

from collections.abc import Callable
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)


def _absent_or(*neutral: Any) -> Callable[[Any], bool]:
    """A test that a value is None or one of ``neutral`` (of the same type: ``0`` is not
    ``False``)."""

    def test(value: Any) -> bool:
        if value is None:
            return True
        for n in neutral:
            numbers = type(value) in (int, float) and type(n) in (int, float)
            if (numbers or type(value) is type(n)) and value == n:
                return True
        return False

    return test


UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": _absent_or(False),
    "best_of": _absent_or(1),
    "suffix": _absent_or(""),
    "tools": _absent_or([]),
    "tool_choice": _absent_or("none"),
    "functions": _absent_or([]),
    "function_call": _absent_or("none"),
}
"""OpenAI fields not implemented, each with the test that a value asks for nothing."""


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields common to both endpoints; ``user`` is accepted (it changes no output)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    """``{"type": "text" | "json_object" | "json_schema", ...}``."""
    """Token id (a string, as JSON keys are) -> bias."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, asks_nothing in UNSUPPORTED.items():
            if name in data and not asks_nothing(data[name]):
                raise ValueError(
                    f"{name}={data[name]!r} is not supported by this server; leave it out"
                )
        return {key: value for key, value in data.items() if key not in UNSUPPORTED}


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    """Top log-probabilities per token (the sampled token's is always given)."""

    @property
    def num_logprobs(self) -> int | None:
        """``SamplingParams.logprobs`` of this request."""
        return self.logprobs


class ChatMessage(BaseModel):
    """One message; ``content`` is text, or a list of text parts (joined by newlines)."""

    model_config = ConfigDict(extra="forbid")
    role: str
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"a content part of type {kind!r} is not supported; send text parts "
                    '({"type": "text", "text": "..."}) or a string'
                )
            texts.append(part["text"])
        return "\n".join(texts)


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """``SamplingParams.logprobs`` of this request."""
        return (self.top_logprobs or 0) if self.logprobs else None

"""Tokenizers: a built-in byte-level one and a wrapper for Hugging Face ``tokenizer.json``.

Both satisfy the :class:`Tokenizer` protocol; :func:`load_tokenizer` picks one from a
string spec (``"byte"`` or a path).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import tokenizers as hf_tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    ``bos_id``, ``eos_id`` and ``pad_id`` are ``None`` where the tokenizer has no such token.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer that needs no files.

    Ids 0..255 are the UTF-8 bytes of the text; then ``pad_id = 256``, ``bos_id = 257``,
    ``eos_id = 258``; ``vocab_size = 259``.
    """

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes plus the three special tokens."""
        return 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Returns the UTF-8 bytes of ``text`` as ids, optionally wrapped in bos/eos."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes byte ids to text; ids outside 0..255 (specials) are skipped.

        Invalid UTF-8 is replaced with U+FFFD, so this never raises.
        """
        data = bytes(i for i in map(int, ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


# Conventional spellings, tried in order when no tokenizer_config.json names the token.
_KNOWN_SPECIALS = {
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    Special tokens are taken from ``tokenizer_config.json`` beside the file when it has the
    key (``bos_token``, ``eos_token``, ``pad_token``; ``null`` means none); otherwise from
    the tokenizer's own special tokens with a conventional spelling (``<s>``, ``</s>``,
    ``<|endoftext|>``, ...).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid ``tokenizer.json``, or the config names a token
            that is not in the vocabulary.
    """

    def __init__(self, path: str | os.PathLike[str]):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
        try:
            self._tok = hf_tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(
                f"{str(path)!r} is not a valid Hugging Face tokenizer.json: {exc}"
            ) from exc
        self.path = path
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        specials = {
            tok.content for tok in self._tok.get_added_tokens_decoder().values() if tok.special
        }
        self._ids = {
            kind: self._special_id(kind, config, specials, path.parent) for kind in _KNOWN_SPECIALS
        }

    def _special_id(
        self, kind: str, config: dict[str, Any], specials: set[str], folder: Path
    ) -> int | None:
        key = f"{kind}_token"
        if key in config:
            entry = config[key]
            if entry is None:  # the config says explicitly that there is none
                return None
            content = entry["content"] if isinstance(entry, dict) else entry
            token_id = self._tok.token_to_id(content)
            if token_id is None:
                raise ValueError(
                    f"{folder / 'tokenizer_config.json'} sets {key}={content!r}, which is "
                    "not in the vocabulary of tokenizer.json; fix or remove that entry"
                )
            return token_id
        for name in _KNOWN_SPECIALS[kind]:
            if name in specials:
                return self._tok.token_to_id(name)
        return None

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` (a special token such as ``</s>`` included), None if unknown."""
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or ``None``."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or ``None``."""
        return self._ids["eos"]

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or ``None``."""
        return self._ids["pad"]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Tokenizes ``text`` (no template specials), optionally wrapped in bos/eos.

        Raises:
            ValueError: ``add_bos``/``add_eos`` is set but the tokenizer has no such token.
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        for flag, kind in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and self._ids[kind] is None:
                raise ValueError(
                    f"add_{kind}=True but {self.path} has no {kind} token; name one as "
                    f"'{kind}_token' in a tokenizer_config.json beside it"
                )
        if add_bos:
            ids.insert(0, self._ids["bos"])
        if add_eos:
            ids.append(self._ids["eos"])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids to text, skipping special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


CONTEXT_TOKENS = 6
"""How many of the preceding tokens ``decode_continuation`` decodes along."""


def decode_continuation(
    tokenizer: Tokenizer, context_ids: Sequence[int], new_ids: Sequence[int]
) -> str:
    """The text ``new_ids`` add after ``context_ids`` (a prompt): what decoding them alone
    gets wrong for SentencePiece-style tokenizers (Llama 2, Mistral), whose decoder drops
    the leading space of the first token ("▁world" decodes to "world" at the start, " world"
    after other text).

    Decodes the last ``CONTEXT_TOKENS`` of ``context_ids`` with and without ``new_ids`` and
    returns the difference. A character whose bytes the context left unfinished (byte-
    fallback tokens) counts as new text. Without context, or if the context's text is not a
    prefix of the whole (a decoder that rewrites across the boundary), ``new_ids`` are
    decoded alone.

    An incremental detokenizer calls it with the prompt as ``context_ids`` and all output
    tokens so far as ``new_ids`` (the text then only grows, except where a trailing
    U+FFFD of an unfinished character is completed), or, to bound the work per token,
    with a window: the text of ``new_ids[j:]`` after ``(context_ids + new_ids)[:j]``.
    """
    context = list(context_ids)[-CONTEXT_TOKENS:]
    if not context:
        return tokenizer.decode(new_ids)
    prefix = tokenizer.decode(context).rstrip("\ufffd")
    text = tokenizer.decode([*context, *new_ids])
    if not text.startswith(prefix):
        return tokenizer.decode(new_ids)
    return text[len(prefix) :]


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """Returns the tokenizer named by ``spec``.

    Args:
        spec: ``"byte"`` for :class:`ByteTokenizer`; a path to a ``tokenizer.json`` file, or
            to a directory holding one, for :class:`HFTokenizer`.

    Raises:
        FileNotFoundError: the path does not exist, or the directory has no tokenizer.json.
        ValueError: the path is a file that is not a ``.json`` tokenizer.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    expected = "expected 'byte', a tokenizer.json file, or a directory containing tokenizer.json"
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"directory {str(path)!r} has no tokenizer.json; {expected}")
        return HFTokenizer(path / "tokenizer.json")
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"tokenizer spec {str(path)!r} is not a .json file; {expected}")
        return HFTokenizer(path)
    raise FileNotFoundError(f"tokenizer spec {str(spec)!r} is not a path that exists; {expected}")

"""Flat token files for corpora larger than memory.

``write_token_memmap`` streams tokenized documents into ``<path>`` (raw little-endian
``uint16`` or ``uint32`` token ids, each document followed by ``eos_id``) and writes a JSON
sidecar ``<path>.json`` with the dtype, token count and eos id. ``open_token_memmap`` maps
the file read-only, so readers touch only the windows they slice.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxstack.data.packing import iter_stream_chunks

_FORMAT = "jaxstack-token-memmap"
_VERSION = 1
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


@dataclasses.dataclass(frozen=True)
class TokenMemmapInfo:
    """What the sidecar of a token file records."""

    dtype: str
    """``"uint16"`` or ``"uint32"``."""
    num_tokens: int
    """Tokens in the file, eos tokens included."""
    num_documents: int
    """Documents written (empty documents are skipped and not counted)."""
    eos_id: int
    """Token that ends every document."""
    vocab_size: int
    """Vocabulary size of the tokenizer that produced the ids."""


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Path of the JSON sidecar of token file ``path``: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_token_memmap(
    token_docs: Iterable[Sequence[int]],
    path: str | os.PathLike[str],
    *,
    eos_id: int,
    vocab_size: int,
    dtype: str | None = None,
) -> TokenMemmapInfo:
    """Writes tokenized documents to a flat token file plus its sidecar.

    Documents are streamed: memory use is one document at a time. Files are written under
    temporary names and renamed at the end, so a crash never leaves a half-written corpus.

    Args:
        token_docs: tokenized documents without eos (one is appended to each); empty ones
            are skipped.
        path: the ``.bin`` file to write; the sidecar goes to ``<path>.json``.
        eos_id: end-of-document token id.
        vocab_size: tokenizer vocabulary size; every id must be below it.
        dtype: ``"uint16"`` or ``"uint32"``; by default ``uint16`` when ``vocab_size`` fits.

    Raises:
        ValueError: a bad dtype/vocab_size/eos_id, a token outside ``[0, vocab_size)``, or no
            non-empty document at all.
    """
    if dtype is None:
        dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not 0 < vocab_size <= np.iinfo(_DTYPES[dtype]).max + 1:
        raise ValueError(f"vocab_size={vocab_size} does not fit dtype {dtype}; use uint32")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} must be in [0, vocab_size={vocab_size})")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    num_tokens = num_docs = 0
    with open(tmp, "wb") as f:
        for chunk in iter_stream_chunks(token_docs, eos_id):
            if chunk.max() >= vocab_size:
                raise ValueError(
                    f"document {num_docs} has token id {chunk.max()} >= vocab_size={vocab_size}"
                )
            f.write(chunk.astype(_DTYPES[dtype]).tobytes())
            num_tokens += chunk.size
            num_docs += 1
    if num_docs == 0:
        tmp.unlink()
        raise ValueError(f"no non-empty documents to write to {path}")
    info = TokenMemmapInfo(dtype, num_tokens, num_docs, eos_id, vocab_size)
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".tmp")
    meta = {"format": _FORMAT, "version": _VERSION, **dataclasses.asdict(info)}
    side_tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)
    os.replace(side_tmp, side)
    return info


def token_memmap_info(path: str | os.PathLike[str]) -> TokenMemmapInfo:
    """Reads and checks the sidecar of token file ``path``.

    Raises:
        FileNotFoundError: the token file or its sidecar is missing.
        ValueError: the sidecar is malformed or does not match the token file's size.
    """
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    if not side.is_file():
        raise FileNotFoundError(
            f"token file {str(path)!r} has no sidecar {str(side)!r}; "
            "write token files with write_token_memmap"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"sidecar {side} is not valid JSON: {exc}") from exc
    fields = [f.name for f in dataclasses.fields(TokenMemmapInfo)]
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{side} is not a {_FORMAT} sidecar; rewrite with write_token_memmap")
    if meta.get("version") != _VERSION or any(k not in meta for k in fields):
        raise ValueError(
            f"sidecar {side} has version {meta.get('version')!r} and keys {sorted(meta)}; "
            f"expected version {_VERSION} with keys {fields}"
        )
    info = TokenMemmapInfo(**{k: meta[k] for k in fields})
    if info.dtype not in _DTYPES:
        raise ValueError(f"sidecar {side} has dtype {info.dtype!r}, not one of {sorted(_DTYPES)}")
    expected = info.num_tokens * _DTYPES[info.dtype].itemsize
    actual = path.stat().st_size
    if actual != expected or info.num_tokens <= 0:
        raise ValueError(
            f"token file {path} has {actual} bytes but its sidecar says {info.num_tokens} "
            f"{info.dtype} tokens ({expected} bytes); the pair does not match, rewrite it"
        )
    return info


def open_token_memmap(path: str | os.PathLike[str]) -> np.memmap:
    """Maps token file ``path`` read-only as a 1-D array; nothing is read until sliced.

    Raises:
        FileNotFoundError, ValueError: see :func:`token_memmap_info`.
    """
    info = token_memmap_info(path)
    return np.memmap(path, dtype=_DTYPES[info.dtype], mode="r", shape=(info.num_tokens,))

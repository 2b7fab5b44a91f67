"""Packing tokenized documents into fixed-length LM rows, and the masks that go with them.

A corpus is a flat token stream in which every document is followed by ``eos_id``; the eos
tokens are the document boundaries. The stream is cut into consecutive, non-overlapping
rows of ``seq_len + 1`` tokens (``inputs = row[:-1]``, ``targets = row[1:]``); the final
partial row is dropped. A document that does not fit in the rest of a row continues at the
start of the next row, where it begins a new segment with positions from 0 (attention
cannot reach across rows, so the continuation is a document of its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

MAX_INT32_TOKEN = 2**31 - 1


def validated_document(doc: Sequence[int] | np.ndarray, index: int, eos_id: int) -> np.ndarray:
    """Returns ``doc`` as a 1-D int64 array after checking it is a valid token document.

    Raises:
        ValueError: ``doc`` is not a 1-D sequence of non-negative integers, or it already
            contains ``eos_id`` (packing appends it; encode without ``add_eos``).
    """
    arr = np.asarray(doc)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"document {index} must be a 1-D sequence of integer token ids, "
            f"got shape {arr.shape} and dtype {arr.dtype}"
        )
    if arr.min() < 0 or arr.max() > MAX_INT32_TOKEN:
        raise ValueError(
            f"document {index} has token ids outside [0, 2**31): min {arr.min()}, max {arr.max()}"
        )
    if np.any(arr == eos_id):
        raise ValueError(
            f"document {index} already contains eos_id={eos_id}; packing appends one eos per "
            "document, so encode without add_eos"
        )
    return arr.astype(np.int64)


def iter_stream_chunks(token_docs: Iterable[Sequence[int]], eos_id: int) -> Iterator[np.ndarray]:
    """Yields each non-empty document followed by ``eos_id``; empty documents are skipped."""
    for index, doc in enumerate(token_docs):
        arr = validated_document(doc, index, eos_id)
        if arr.size:
            yield np.append(arr, eos_id)


def concat_documents(token_docs: Iterable[Sequence[int]], eos_id: int) -> np.ndarray:
    """Returns the flat int32 token stream: every non-empty document followed by ``eos_id``."""
    chunks = list(iter_stream_chunks(token_docs, eos_id))
    if not chunks:
        return np.zeros((0,), np.int32)
    return np.concatenate(chunks).astype(np.int32)


def segment_ids(rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index within each row, starting at 1: ``[..., n] -> [..., n] int32``.

    A token belongs to segment ``1 + (number of eos tokens before it in the row)``, so each
    eos belongs to the document it ends. Segment 0 is never produced; it is left for padding.
    """
    is_eos = (rows == eos_id).astype(np.int32)
    return (np.cumsum(is_eos, axis=-1) - is_eos + 1).astype(np.int32)


def positions(segments: np.ndarray) -> np.ndarray:
    """Position of each token within its segment, restarting at 0: ``[..., n] -> [..., n]``."""
    idx = np.broadcast_to(np.arange(segments.shape[-1], dtype=np.int32), segments.shape)
    is_start = np.ones(segments.shape, bool)
    is_start[..., 1:] = segments[..., 1:] != segments[..., :-1]
    starts = np.maximum.accumulate(np.where(is_start, idx, 0), axis=-1)
    return (idx - starts).astype(np.int32)


def pack_documents(
    token_docs: Iterable[Sequence[int]], seq_len: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Packs documents into rows of ``seq_len + 1`` tokens (see the module docstring).

    Args:
        token_docs: tokenized documents, without eos (it is appended here); empty ones are
            skipped.
        seq_len: model sequence length ``L``; rows hold ``L + 1`` tokens.
        eos_id: end-of-document token id.

    Returns:
        ``(rows, segments)``, both ``[num_rows, L + 1] int32``; ``segments`` is the document
        index within the row, from 1. ``num_rows`` may be 0 if the corpus is short.

    Raises:
        ValueError: bad ``seq_len`` or a bad document (see :func:`validated_document`).
    """
    check_seq_len(seq_len)
    stream = concat_documents(token_docs, eos_id)
    num_rows = stream.size // (seq_len + 1)
    rows = stream[: num_rows * (seq_len + 1)].reshape(num_rows, seq_len + 1)
    return rows, segment_ids(rows, eos_id)


def packed_example(row: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Turns one row of ``L + 1`` tokens into a training example of length ``L``.

    Returns:
        ``input_ids``, ``targets``, ``segment_ids``, ``positions`` (``[L] int32``) and
        ``loss_mask`` (``[L] float32``: 0 where the target is the first token of the next
        document, i.e. the input is an eos, else 1).
    """
    row = np.asarray(row, dtype=np.int32)
    seg = segment_ids(row, eos_id)
    return {
        "input_ids": row[:-1],
        "targets": row[1:],
        "segment_ids": seg[:-1],
        "positions": positions(seg)[:-1],
        "loss_mask": (seg[1:] == seg[:-1]).astype(np.float32),
    }


def check_seq_len(seq_len: int) -> None:
    """Raises ``ValueError`` unless ``seq_len`` is a positive int."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")

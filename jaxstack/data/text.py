"""Text sources and the packed language-modelling dataset built from them.

Formats: plain text files (each file is one document) and JSONL files (one JSON object per
line, the document in a string field, ``"text"`` by default). Packing and masks are
described in :mod:`jaxstack.data.packing`.
"""

from __future__ import annotations

import glob
import json
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxstack.data.memmap import open_token_memmap, token_memmap_info
from jaxstack.data.packing import check_seq_len, concat_documents, packed_example
from jaxstack.data.tokenizers import Tokenizer

PathsLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def resolve_paths(paths: PathsLike) -> list[Path]:
    """Expands a glob pattern or a list of paths into existing files, in sorted glob order.

    Raises:
        FileNotFoundError: a listed path does not exist, or a pattern matches no file.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise FileNotFoundError("no input files given; pass a path, a list of paths or a glob")
    out = []
    for item in items:
        item = str(item)
        if glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"glob {item!r} matches no files")
            out.extend(Path(m) for m in matches)
        elif os.path.isfile(item):
            out.append(Path(item))
        else:
            raise FileNotFoundError(f"input file {item!r} does not exist")
    return out


def read_text_files(paths: PathsLike) -> Iterator[str]:
    """Yields the UTF-8 contents of each file; each file is one document.

    Raises:
        FileNotFoundError: see :func:`resolve_paths`.
    """
    for path in resolve_paths(paths):
        yield path.read_text(encoding="utf-8")


def iter_jsonl(paths: PathsLike) -> Iterator[tuple[str, dict]]:
    """Yields ``("file:line", record)`` for every non-blank line of the JSONL files.

    Raises:
        FileNotFoundError: see :func:`resolve_paths`.
        ValueError: a line is not a JSON object; the message names the file and line.
    """
    for path in resolve_paths(paths):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc})") from exc
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{where}: a {type(record).__name__}, not a JSON object; each line "
                        "must be one object"
                    )
                yield where, record


def read_jsonl(paths: PathsLike, field: str = "text") -> Iterator[str]:
    """Yields ``record[field]`` for every non-blank line of the JSONL files.

    Raises:
        FileNotFoundError: see :func:`resolve_paths`.
        ValueError: a line is not a JSON object, lacks ``field``, or its value is not a
            string; the message names the file and line.
    """
    for where, record in iter_jsonl(paths):
        if field not in record:
            raise ValueError(
                f"{where}: no field {field!r} (found {sorted(record)}); pass field= to choose "
                "the field holding the text"
            )
        if not isinstance(record[field], str):
            raise ValueError(
                f"{where}: field {field!r} is {type(record[field]).__name__}, not a string"
            )
        yield record[field]


class PackedDataset:
    """Random-access dataset of packed LM examples over a flat token stream.

    Example ``i`` is tokens ``[i * (L + 1), (i + 1) * (L + 1))`` of the stream, turned into
    the fields of :func:`jaxstack.data.packing.packed_example`: ``input_ids``, ``targets``,
    ``segment_ids``, ``positions`` (``[L] int32``) and ``loss_mask`` (``[L] float32``). The
    stream may be a ``np.memmap``: only the window of each example is read.

    Args:
        tokens: 1-D integer token stream, every document followed by ``eos_id``.
        seq_len: sequence length ``L`` of each example.
        eos_id: end-of-document token id.

    Raises:
        ValueError: ``tokens`` is not a 1-D integer array, or holds fewer than ``L + 1``
            tokens.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, eos_id: int):
        check_seq_len(seq_len)
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"tokens must be a 1-D integer array, got shape {tokens.shape} "
                f"and dtype {tokens.dtype}"
            )
        if tokens.size < seq_len + 1:
            raise ValueError(
                f"corpus has {tokens.size} tokens (one eos per document included) but "
                f"seq_len={seq_len} needs at least {seq_len + 1} for one example; "
                "add data or lower seq_len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.eos_id = eos_id

    def __len__(self) -> int:
        return self.tokens.size // (self.seq_len + 1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example index {index} out of range for {n} examples")
        i %= n
        width = self.seq_len + 1
        return packed_example(np.asarray(self.tokens[i * width : (i + 1) * width]), self.eos_id)

    @classmethod
    def from_token_docs(
        cls, token_docs: Iterable[Sequence[int]], *, seq_len: int, eos_id: int
    ) -> PackedDataset:
        """Packs tokenized documents (without eos) held in memory."""
        return cls(concat_documents(token_docs, eos_id), seq_len=seq_len, eos_id=eos_id)

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        eos_id: int | None = None,
    ) -> PackedDataset:
        """Tokenizes and packs documents given as strings.

        ``eos_id`` defaults to ``tokenizer.eos_id``.

        Raises:
            ValueError: neither ``eos_id`` nor ``tokenizer.eos_id`` is set, or the corpus is
                too small (see the class docstring).
        """
        if eos_id is None:
            eos_id = tokenizer.eos_id
        if eos_id is None:
            raise ValueError("tokenizer has no eos token; pass eos_id= to mark document ends")
        docs = (tokenizer.encode(text) for text in texts)
        return cls.from_token_docs(docs, seq_len=seq_len, eos_id=eos_id)

    @classmethod
    def from_text_files(
        cls,
        paths: PathsLike,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        eos_id: int | None = None,
    ) -> PackedDataset:
        """Tokenizes and packs plain text files (a path, a list or a glob); one per document."""
        return cls.from_texts(read_text_files(paths), tokenizer, seq_len=seq_len, eos_id=eos_id)

    @classmethod
    def from_jsonl(
        cls,
        paths: PathsLike,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        field: str = "text",
        eos_id: int | None = None,
    ) -> PackedDataset:
        """Tokenizes and packs the ``field`` of every line of JSONL files."""
        texts = read_jsonl(paths, field)
        return cls.from_texts(texts, tokenizer, seq_len=seq_len, eos_id=eos_id)

    @classmethod
    def from_memmap(cls, path: str | os.PathLike[str], *, seq_len: int) -> PackedDataset:
        """Packs a token file written by :func:`~jaxstack.data.memmap.write_token_memmap`.

        The file is memory-mapped, never loaded whole; ``eos_id`` comes from its sidecar.
        """
        eos_id = token_memmap_info(path).eos_id
        return cls(open_token_memmap(path), seq_len=seq_len, eos_id=eos_id)


def lm_collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples field by field into a batch: ``[L]`` fields become ``[B, L]``.

    This is the default LM ``collate_fn``.

    Raises:
        ValueError: ``examples`` is empty, or the examples do not all have the same fields.
    """
    if not examples:
        raise ValueError("lm_collate got no examples; the batch must hold at least one")
    keys = list(examples[0])
    for i, ex in enumerate(examples):
        if set(ex) != set(keys):
            raise ValueError(
                f"example {i} has fields {sorted(ex)} but example 0 has {sorted(keys)}; "
                "all examples in a batch need the same fields"
            )
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in keys}

"""Data: tokenizers, text sources, packing, token files and the checkpointable loader."""

from jaxstack.data.loader import DataLoader
from jaxstack.data.memmap import (
    TokenMemmapInfo,
    open_token_memmap,
    token_memmap_info,
    write_token_memmap,
)
from jaxstack.data.packing import pack_documents, packed_example
from jaxstack.data.prefix import Prefix
from jaxstack.data.text import PackedDataset, lm_collate, read_jsonl, read_text_files
from jaxstack.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataLoader",
    "HFTokenizer",
    "PackedDataset",
    "Prefix",
    "TokenMemmapInfo",
    "Tokenizer",
    "lm_collate",
    "load_tokenizer",
    "open_token_memmap",
    "pack_documents",
    "packed_example",
    "read_jsonl",
    "read_text_files",
    "token_memmap_info",
    "write_token_memmap",
]

"""Read and write the safetensors files of a Hugging Face directory, one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data after the header)
plus an optional ``"__metadata__"`` string map, then the raw tensor bytes. A model split over
several files has ``model.safetensors.index.json`` with ``{"weight_map": {name: file}}``.

This reader parses the header itself (so bfloat16 and float8 tensors read as ``ml_dtypes``
arrays, which the ``safetensors`` numpy backend cannot) and checks it against the file size,
so a truncated or corrupt file fails with the file and tensor named.
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
"""safetensors dtype names -> numpy dtypes."""

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 2**20


class CorruptFileError(ValueError):
    """A safetensors file whose header or size is inconsistent."""


class TensorInfo:
    """Where one tensor lies: file, dtype, shape and absolute byte range."""

    def __init__(self, file: Path, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int):
        self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, validated against its size.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptFileError: the header is not valid safetensors or points past the end of file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(f"{path} is too short ({size} bytes) to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CorruptFileError(
                f"{path} declares a {header_len}-byte header but the file has {size} bytes; "
                "the file is corrupt or not safetensors (re-download or re-export it)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{path} has an unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name != "__metadata__":
            tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors


def _tensor_info(path: Path, name: str, entry, data_start: int, size: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(
            f"{path}: tensor {name!r} has a malformed header entry {entry!r} ({exc!r}); "
            f"known dtypes: {sorted(DTYPES)}"
        ) from exc
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or min(shape, default=0) < 0:
        raise CorruptFileError(
            f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) needs {nbytes} bytes "
            f"but its data_offsets {[begin, end]} span {end - begin}"
        )
    if data_start + end > size:
        raise CorruptFileError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
            "bytes; the file is truncated (re-download or re-export it)"
        )
    return TensorInfo(path, dtype, shape, data_start + begin, data_start + end)


class SafetensorsReader:
    """The tensors of a Hugging Face model directory, read one at a time into host memory.

    Uses ``model.safetensors.index.json`` when present, else ``model.safetensors``, else every
    ``*.safetensors`` file in the directory.

    Raises:
        FileNotFoundError: no safetensors file, or the index names a missing file.
        CorruptFileError: a header is invalid, or the index names a tensor its file lacks.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                message = f"{index} is not a valid safetensors index: {exc!r}"
                raise CorruptFileError(message) from exc
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            weight_map, files = None, sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{self.directory} holds no *.safetensors weights; point to a Hugging Face model "
                "directory (config.json + model.safetensors or sharded files with their index)"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            self.tensors.update(read_header(self.directory / name))
        for key, name in (weight_map or {}).items():
            info = self.tensors.get(key)
            if info is None or info.file.name != name:
                raise CorruptFileError(
                    f"{index} maps tensor {key!r} to {name}, but that file does not hold it"
                )

    def keys(self) -> set[str]:
        """Names of every tensor in the directory."""
        return set(self.tensors)

    def info(self, key: str) -> TensorInfo:
        """File, dtype, shape and byte range of ``key``.

        Raises:
            KeyError: no file holds ``key``.
        """
        if key not in self.tensors:
            raise KeyError(
                f"tensor {key!r} is missing from the safetensors files in {self.directory}; "
                "the checkpoint is incomplete or config.json describes a different model"
            )
        return self.tensors[key]

    def read(self, key: str) -> np.ndarray:
        """``key`` as a fresh host array in its stored dtype (one read, no memory map)."""
        info = self.info(key)
        buffer = np.empty(info.end - info.start, np.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            view, done = memoryview(buffer), 0
            while done < len(buffer):
                count = f.readinto(view[done:])
                if not count:
                    raise CorruptFileError(
                        f"{info.file}: tensor {key!r} is cut short after {done} of "
                        f"{len(buffer)} bytes (was the file modified while loading?)"
                    )
                done += count
        return buffer.view(info.dtype).reshape(info.shape)


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (``F32``, ``BF16``, ...)."""
    for name, candidate in DTYPES.items():
        if candidate == np.dtype(dtype):
            return name
    raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors")


def write_safetensors(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int = 4 * 2**30,
    write: bool = True,
) -> list[str]:
    """Stream tensors to ``model.safetensors`` (or numbered shards plus the index) in order.

    ``tensors`` declares ``(name, shape, dtype)`` up front (headers come first in each file);
    ``fetch(name)`` is then called once per tensor, in order, and must return a contiguous
    array of that shape and dtype, so only one tensor is in host memory at a time. With
    ``write=False`` every ``fetch`` still runs (for collectives on other processes) but nothing
    is written. Returns the file names.

    Raises:
        ValueError: ``fetch`` returned the wrong shape or dtype, or a name repeats.
    """
    declared = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in tensors]
    if len({name for name, _, _ in declared}) != len(declared):
        raise ValueError("write_safetensors got the same tensor name twice")
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    shard_bytes = 0
    for entry in declared:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes
    directory = Path(directory)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        _write_file(directory / name, shard, fetch, write)
    if len(shards) > 1 and write:
        pairs = zip(names, shards, strict=True)
        weight_map = {tensor: name for name, shard in pairs for tensor, _, _ in shard}
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in declared)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def _write_file(path: Path, shard, fetch: Callable[[str], np.ndarray], write: bool) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in shard:
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") if write else open(os.devnull, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype in shard:
            array = fetch(name)
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(
                    f"fetch({name!r}) returned {array.dtype} {array.shape}; "
                    f"declared {dtype} {shape}"
                )
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

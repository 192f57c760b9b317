""".safetensors embedding files, read only after their header has been checked against the file.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and
byte offsets per tensor, optional string metadata) and the raw tensor bytes. A header that lies
(about its own length, a tensor's size or where its bytes are) is refused before any tensor is read.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from stages.common.embedding.core import EmbeddingError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_EMBEDDING_TENSORS = 16  # an embedding holds one or two; more means a model, a LoRA or another kind of file
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # dtype → bytes per element


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    begin: int
    end: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The validated tensor entries and metadata of a .safetensors embedding file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise EmbeddingError(f"{path}: {size} bytes is too short for a .safetensors file (8-byte header length, then the header)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise EmbeddingError(
                f"{path}: its header says it is {header_len} bytes long, but only {size - 8} bytes follow the length "
                "field; the file is truncated or its header lies. Refusing to read it"
            )
        if header_len > MAX_HEADER_BYTES:
            raise EmbeddingError(f"{path}: header of {header_len} bytes is over the {MAX_HEADER_BYTES}-byte limit of the safetensors format")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EmbeddingError(f"{path}: the safetensors header is not valid JSON ({error}); the file is damaged or not a safetensors file") from None
    if not isinstance(header, dict):
        raise EmbeddingError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise EmbeddingError(f"{path}: the safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_EMBEDDING_TENSORS:
        names = ", ".join(sorted(header)[:5])
        raise EmbeddingError(
            f"{path}: holds {len(header)} tensors ({names}, ...); an embedding holds one tensor per text encoder. "
            "This is a model, a LoRA or another kind of file, not an embedding"
        )
    entries = {key: _parse_entry(path, key, value) for key, value in header.items()}
    _check_layout(path, entries, size - 8 - header_len)
    return entries, metadata


def _parse_entry(path: Path, key: str, value: object) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise EmbeddingError(f"{path}: tensor {key!r} has header entry {value!r}; expected dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in FLOAT_DTYPES:
        raise EmbeddingError(f"{path}: tensor {key!r} has dtype {dtype!r}; embedding vectors are one of {', '.join(FLOAT_DTYPES)}")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2 and all(isinstance(d, int) and d >= 1 for d in shape)):
        raise EmbeddingError(f"{path}: tensor {key!r} has shape {shape!r}; embedding vectors are [width] or [vectors, width]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise EmbeddingError(f"{path}: tensor {key!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * FLOAT_DTYPES[dtype]
    if end - begin != expected:
        raise EmbeddingError(
            f"{path}: tensor {key!r} claims shape {shape} {dtype} ({expected} bytes) but its offsets span {end - begin} bytes; the header lies"
        )
    return TensorEntry(dtype, shape, begin, end)


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_len: int) -> None:
    """Tensor bytes must tile the data section exactly: no gaps, no overlaps, nothing past the end."""
    position = 0
    for key, entry in sorted(entries.items(), key=lambda item: item[1].begin):
        if entry.begin != position:
            raise EmbeddingError(f"{path}: tensor {key!r} starts at byte {entry.begin}, expected {position}; the header's offsets overlap or leave gaps")
        position = entry.end
    if position != data_len:
        raise EmbeddingError(
            f"{path}: the header accounts for {position} bytes of tensor data but the file holds {data_len}; "
            "the file is truncated or has bytes the header does not describe"
        )


def load_safetensors_embedding(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a .safetensors file whose header passed read_safetensors_header."""
    entries, metadata = read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in entries}
    except Exception as error:  # safetensors raises its own error types
        raise EmbeddingError(f"{path}: not a readable .safetensors file ({type(error).__name__}: {error})") from None
    return tensors, metadata

"""Write an embedding in a format named by the user, and convert files between formats."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from stages.common.embedding.core import Embedding, save_a1111_pt, save_diffusers, save_safetensors
from stages.common.embedding.png import save_png_embedding
from stages.common.embedding.read import read_embedding
from stages.common.errors import InputError

# format name → writer(embedding, path) → paths written
EMBEDDING_WRITERS: dict[str, Callable[[Embedding, Path], list[Path]]] = {
    "safetensors": save_safetensors,  # emb_params, or clip_l + clip_g (AUTOMATIC1111/Forge, ComfyUI, kohya, diffusers)
    "pt": save_a1111_pt,  # AUTOMATIC1111's dict, legacy torch serialization
    "diffusers": save_diffusers,  # {token: tensor} per text encoder (SDXL: OUT and OUT_2)
    "png": save_png_embedding,  # AUTOMATIC1111's embedding in PNG (text chunk and pixels)
}


def write_embedding(embedding: Embedding, to: str, out: Path) -> list[Path]:
    """Write `embedding` as format `to` at `out`; return every path written."""
    try:
        writer = EMBEDDING_WRITERS[to]
    except KeyError:
        raise InputError(f"unknown embedding format {to!r}; allowed: {', '.join(EMBEDDING_WRITERS)}") from None
    return writer(embedding, Path(out))


def convert_embedding(source: Path, to: str, out: Path) -> list[Path]:
    """Read any supported embedding file and write it as format `to` at `out`."""
    if Path(out).resolve() == Path(source).resolve():
        raise InputError(f"{out}: the output would overwrite the input; give another -o path")
    return write_embedding(read_embedding(source), to, out)

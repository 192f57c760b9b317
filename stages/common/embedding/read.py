"""Read the embedding files users have, recognised by content (never by extension), running no one's code.

Pickles (.pt/.bin/.ckpt) go only through `torch.load(weights_only=True)`, whose unpickler builds
tensors and plain containers and refuses everything else; the one class added to its allow-list
is torch's ParameterDict, which old textual-inversion files hold and which carries no code.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common.embedding.core import SDXL_KEYS, Embedding, EmbeddingError, check_embedding, check_embedding_fits
from stages.common.embedding.png import read_image_payload
from stages.common.embedding.safetensors_file import load_safetensors_embedding
from stages.common.families import Family
from stages.common.errors import MissingInput

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024  # 75 SDXL vectors in fp32 are 0.6 MB; a bigger file is a model or a LoRA
SUPPORTED = (
    ".safetensors (emb_params or clip_l + clip_g), AUTOMATIC1111 .pt/.bin pickles, "
    "diffusers learned_embeds ({token: tensor}) and AUTOMATIC1111 PNG/WebP embeddings"
)


@dataclass
class EmbeddingFile:
    """An embedding as read from a file, with what the file turned out to be."""

    path: Path
    format: str  # e.g. "AUTOMATIC1111 string_to_param in a legacy torch pickle"
    embedding: Embedding


def detect_container(path: Path) -> str:
    """safetensors | torch-zip | pickle | image, from the file's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise EmbeddingError(f"{path}: the file is empty (0 bytes); an interrupted download or save?")
    if head.startswith(b"\x89PNG\r\n\x1a\n") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head.startswith((b"\xff\xd8\xff", b"GIF8")):
        raise EmbeddingError(f"{path}: a JPEG/GIF image cannot hold an embedding; AUTOMATIC1111 embeds them only in PNG or lossless WebP")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    # safetensors before pickles: a header length such as 384 (0x180) also starts with byte 0x80
    if len(head) > 8 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head[0] == 0x80:  # pickle protocol 2+ opcode: torch's legacy format, or a bare pickle
        return "pickle"
    raise EmbeddingError(f"{path}: not an embedding file (it starts with bytes {head[:8].hex(' ')}); tiflow reads {SUPPORTED}")


def open_embedding_file(path: str | Path) -> EmbeddingFile:
    """Read any supported embedding file; refuse with an EmbeddingError anything unsafe or unusable."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such file" if not path.exists() else f"{path}: is a folder, not an embedding file")
    container = detect_container(path)
    metadata: dict[str, str] = {}
    if container == "safetensors":
        data, metadata = load_safetensors_embedding(path)
        where = "a safetensors file"
    else:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise EmbeddingError(
                f"{path}: {size / 2**20:.0f} MB is far more than an embedding (at most a few MB); this looks like a model or a LoRA"
            )
        if container == "image":
            data, origin = read_image_payload(path)
            where = f"an AUTOMATIC1111 image embedding ({origin})"
        else:
            data = _load_pickle(path)
            where = "a torch zip pickle" if container == "torch-zip" else "a legacy torch pickle"
    embedding, layout = embedding_from_state(data, str(path), fallback_name=path.stem, metadata=metadata)
    return EmbeddingFile(path=path, format=f"{layout} in {where}", embedding=embedding)


def read_embedding(path: str | Path) -> Embedding:
    """The embedding in any supported file (see open_embedding_file)."""
    return open_embedding_file(path).embedding


def read_embedding_for_model(path: str | Path, family: Family, widths: tuple[int, ...]) -> Embedding:
    """Read an embedding and refuse it unless it fits a `family` model whose text encoders are `widths` wide."""
    embedding = read_embedding(path)
    check_embedding_fits(embedding, family, widths, str(path))
    return embedding


def _load_pickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        # torch's safe unpickler names what it refused after "WeightsUnpickler error:"
        detail = str(error).partition("WeightsUnpickler error:")[2].strip() or str(error).strip()
        reason = (detail.splitlines()[0] if detail else "unknown").split(" was not an allowed global")[0]
        if reason.startswith("Unsupported operand"):
            raise EmbeddingError(f"{path}: not a readable PyTorch file ({reason}); it may be damaged or another format renamed") from None
        raise EmbeddingError(
            f"{path}: refused, loading it would run code ({reason}). tiflow reads pickles only through a loader "
            "that cannot run code; ask for a .safetensors version, or convert it with a tool you trust"
        ) from None
    except Exception as error:  # truncated zips, bad magic numbers, ...
        raise EmbeddingError(f"{path}: not a readable PyTorch file ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def embedding_from_state(data: object, source: str, fallback_name: str, metadata: dict[str, str] | None = None) -> tuple[Embedding, str]:
    """An Embedding from whatever dict a file held, and the layout it had, in words."""
    metadata = metadata or {}
    if isinstance(data, torch.Tensor):
        vectors, layout, info = {"emb_params": data}, "a bare tensor", {}
    elif not isinstance(data, dict):
        raise EmbeddingError(f"{source}: holds a {type(data).__name__}, not an embedding dict; tiflow reads {SUPPORTED}")
    elif "string_to_param" in data:
        vectors, layout, info = {"emb_params": _single_term(data["string_to_param"], source)}, "AUTOMATIC1111 string_to_param", data
    elif "clip_l" in data or "clip_g" in data:
        missing = [key for key in SDXL_KEYS if key not in data]
        if missing:
            raise EmbeddingError(f"{source}: has {' and '.join(k for k in SDXL_KEYS if k in data)} but no {missing[0]}; an SDXL embedding needs both clip_l and clip_g")
        vectors, layout, info = {key: data[key] for key in SDXL_KEYS}, "SDXL clip_l + clip_g", data
    elif "emb_params" in data:
        vectors, layout, info = {"emb_params": data["emb_params"]}, "emb_params", data
    else:
        tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
        if len(tensors) != 1:
            shown = ", ".join(map(str, list(data)[:6]))
            raise EmbeddingError(
                f"{source}: holds {len(tensors)} tensors (keys: {shown}); an embedding file has string_to_param, "
                "emb_params, clip_l + clip_g, or a single {token: tensor} entry"
            )
        token, tensor = next(iter(tensors.items()))
        vectors, layout, info = {"emb_params": tensor}, "diffusers learned_embeds {token: tensor}", {"name": token}
    embedding = Embedding(
        name=_text(info.get("name")) or metadata.get("name") or fallback_name,
        vectors={key: _as_vectors(value, key, source) for key, value in vectors.items()},
        step=_step(info.get("step", metadata.get("step"))),
        checkpoint_hash=_text(info.get("sd_checkpoint") or info.get("hash")) or metadata.get("sd_checkpoint"),
        checkpoint_name=_text(info.get("sd_checkpoint_name")) or metadata.get("sd_checkpoint_name"),
    )
    check_embedding(embedding, source)
    return embedding, layout


def _single_term(params: object, source: str) -> object:
    if isinstance(params, torch.nn.ParameterDict):  # files from torch ≤ 1.11 pickled the module itself
        params = vars(params).get("_parameters", {})
    if not isinstance(params, dict):
        raise EmbeddingError(f"{source}: string_to_param is a {type(params).__name__}, not a dict of tensors")
    if len(params) != 1:
        raise EmbeddingError(f"{source}: string_to_param holds {len(params)} terms; an embedding file holds exactly one (AUTOMATIC1111 reads one too)")
    return next(iter(params.values()))


def _as_vectors(value: object, key: str, source: str) -> torch.Tensor:
    """[vectors, width] float32; diffusers' single-vector files store a bare [width]."""
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise EmbeddingError(f"{source}: {key} holds {value.dtype} values; embedding vectors are floating point")
    if value.ndim == 1:
        value = value.unsqueeze(0)
    if value.ndim != 2:
        raise EmbeddingError(f"{source}: {key} has shape {list(value.shape)}; embedding vectors are [vectors, width] or [width]")
    return value.detach().to(torch.float32).contiguous()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _step(value: object) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        log.warning("ignoring the embedding's unreadable step value %r", value)
        return 0


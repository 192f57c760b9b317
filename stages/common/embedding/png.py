"""AUTOMATIC1111's "embedding in PNG": the same dict as its .pt file, carried twice by an image.

1. a `sd-ti-embedding` text chunk: base64 of JSON, tensors written as {"TORCHTENSOR": nested lists};
2. the pixels: the zlib-compressed JSON split into nibbles, low nibbles in a block left of the
   picture and high nibbles in a block right of it (one black column between each), each block
   XOR-ed with a fixed LCG sequence so the data looks like noise. Only the low 4 bits of every
   channel carry data; the high 4 bits are free decoration. This survives re-saving as lossless
   WebP, which drops text chunks.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from stages.common.embedding.core import Embedding, EmbeddingError, a1111_payload
from stages.common.files import atomic_path

TEXT_CHUNK_KEY = "sd-ti-embedding"
TENSOR_TAG = "TORCHTENSOR"
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024  # decompressed JSON; an embedding is well under 10 MB
CHANNELS = 3
CARD_BACKGROUND = (46, 52, 64)  # no channel is 0, so the picture is never taken for the black separators


# ------------------------------------------------------------------------------------- JSON payload


def encode_payload(payload: dict) -> bytes:
    """JSON of an AUTOMATIC1111 embedding dict, tensors as {"TORCHTENSOR": lists} (exact for fp32 values)."""

    def tensor_to_json(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return {TENSOR_TAG: value.detach().cpu().double().tolist()}
        raise TypeError(f"cannot store {type(value).__name__} in an embedding PNG")

    return json.dumps(payload, default=tensor_to_json).encode("utf-8")


def decode_payload(data: bytes, source: str) -> dict:
    """The dict behind encode_payload's JSON; tensors come back as float64 tensors."""

    def json_to_tensor(obj: dict) -> object:
        if set(obj) == {TENSOR_TAG}:
            try:
                return torch.tensor(obj[TENSOR_TAG], dtype=torch.float64)
            except (TypeError, ValueError) as error:
                raise EmbeddingError(f"{source}: a stored tensor is not a rectangular list of numbers ({error})") from None
        return obj

    try:
        payload = json.loads(data.decode("utf-8"), object_hook=json_to_tensor)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise EmbeddingError(f"{source}: the embedded data is not valid JSON ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict):
        raise EmbeddingError(f"{source}: the embedded data is a JSON {type(payload).__name__}, not an embedding dict")
    return payload


def _decompress(data: bytes, source: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_PAYLOAD_BYTES)
    except zlib.error as error:
        raise EmbeddingError(f"{source}: the data in its pixels is not a compressed embedding ({error})") from None
    if inflater.unconsumed_tail:
        raise EmbeddingError(f"{source}: the data in its pixels inflates past {MAX_PAYLOAD_BYTES} bytes; refusing it")
    if not inflater.eof:
        raise EmbeddingError(f"{source}: the data in its pixels is cut short (cropped or resized image?)")
    return out  # bytes after the stream's end are the padding that fills the block


# -------------------------------------------------------------------------------- data in the pixels


def lcg_sequence(count: int) -> np.ndarray:
    """AUTOMATIC1111's generator: seed ← (1664525·seed + 1013904223) mod 2³², value = seed mod 255."""
    values = np.empty(count, dtype=np.uint8)
    seed = 0
    for i in range(count):
        seed = (1664525 * seed + 1013904223) & 0xFFFFFFFF
        values[i] = seed % 255
    return values


def _lcg_mask(shape: tuple[int, ...]) -> np.ndarray:
    """The low-nibble mask XOR-ed over a data block (the same sequence, restarted, for each block)."""
    return (lcg_sequence(math.prod(shape)) & 0x0F).reshape(shape)


def _decoration(shape: tuple[int, ...], shades: np.ndarray) -> np.ndarray:
    """High-nibble texture drawn from the vector magnitudes: carries no data, only looks like the embedding."""
    return shades[np.arange(math.prod(shape)) % len(shades)].reshape(shape) & 0xF0


def embed_data_in_image(image: Image.Image, payload: dict) -> Image.Image:
    """A new image: [low-nibble block | black | image | black | high-nibble block], readable by AUTOMATIC1111."""
    data = np.frombuffer(zlib.compress(encode_payload(payload), level=9), dtype=np.uint8)
    height = image.height
    columns = math.ceil(len(data) / (height * CHANNELS))
    shape = (height, columns, CHANNELS)
    padded = np.resize(data, math.prod(shape)).reshape(shape)  # np.resize repeats the data, as AUTOMATIC1111 does
    # SD1/2 payloads keep the tensor under string_to_param, SDXL ones at the top level
    tensors = [v for v in payload.values() if isinstance(v, torch.Tensor)] or list(payload["string_to_param"].values())
    magnitudes = tensors[0].detach().abs().flatten()[:1024].double().numpy()
    shades = (magnitudes / max(magnitudes.max(), 1e-12) * 255).astype(np.uint8)
    mask = _lcg_mask(shape)
    low = (padded & 0x0F) ^ _decoration(shape, shades) ^ mask
    high = (padded >> 4) ^ _decoration(shape, shades[::-1]) ^ mask
    canvas = Image.new("RGB", (image.width + 2 * columns + 2, height), (0, 0, 0))
    canvas.paste(Image.fromarray(low.astype(np.uint8)), (0, 0))
    canvas.paste(image.convert("RGB"), (columns + 1, 0))
    canvas.paste(Image.fromarray(high.astype(np.uint8)), (columns + 1 + image.width + 1, 0))
    return canvas


def _crop_black(pixels: np.ndarray) -> np.ndarray | None:
    """Drop the outer rows/columns in which no pixel has all channels above 0 (AUTOMATIC1111's crop)."""
    lit = (pixels > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return None
    return pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def extract_image_data(image: Image.Image, source: str) -> dict | None:
    """The embedding dict stored in an image's pixels, or None when the pixels hold none."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8))
    if pixels is None:
        return None
    nibbles = pixels & 0x0F
    separators = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if separators.size < 2:
        return None
    low, high = nibbles[:, : separators.min()], nibbles[:, separators.max() + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    low = low ^ _lcg_mask(low.shape)
    high = high ^ _lcg_mask(high.shape)
    data = ((high << 4) | low).astype(np.uint8).tobytes()
    return decode_payload(_decompress(data, source), source)


# ---------------------------------------------------------------------------------- files


def render_embedding_card(embedding: Embedding, size: int = 256) -> Image.Image:
    """A plain picture naming the embedding, for a PNG embedding made without a preview image."""
    card = Image.new("RGB", (size, size), CARD_BACKGROUND)
    draw = ImageDraw.Draw(card)
    lines = [f"<{embedding.name}>", f"{embedding.vector_count} vectors", "width " + " + ".join(map(str, embedding.widths)), f"step {embedding.step}"]
    for i, line in enumerate(lines):
        draw.text((10, 10 + 18 * i), line, fill=(235, 235, 235))
    return card


def save_png_embedding(embedding: Embedding, path: Path, image: Image.Image | None = None) -> list[Path]:
    """AUTOMATIC1111's PNG embedding: `image` (or a card) with the data in a text chunk and in the pixels."""
    payload = a1111_payload(embedding)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, base64.b64encode(encode_payload(payload)).decode("ascii"))
    canvas = embed_data_in_image(image if image is not None else render_embedding_card(embedding), payload)
    with atomic_path(path) as temp:
        canvas.save(temp, format="PNG", pnginfo=info)
    return [Path(path)]


def read_image_payload(path: Path) -> tuple[dict, str]:
    """The embedding dict in a PNG/WebP and where it came from (the text chunk, else the pixels)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.format not in ("PNG", "WEBP"):
                raise EmbeddingError(f"{path}: a {image.format} image cannot hold an AUTOMATIC1111 embedding; only PNG and lossless WebP can")
            text = _text_chunk(image, path)
            if text is not None:
                try:
                    raw = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError) as error:
                    raise EmbeddingError(f"{path}: its {TEXT_CHUNK_KEY} text chunk is not base64 ({error})") from None
                return decode_payload(raw, str(path)), f"{TEXT_CHUNK_KEY} text chunk"
            payload = extract_image_data(image, str(path))
    except (OSError, Image.DecompressionBombError) as error:
        raise EmbeddingError(f"{path}: not a readable image ({error})") from None
    if payload is None:
        raise EmbeddingError(f"{path}: this image holds no embedding: no {TEXT_CHUNK_KEY} text chunk and no data in its pixels")
    return payload, "data in the pixels"


def _text_chunk(image: Image.Image, path: Path) -> str | None:
    try:
        chunks = getattr(image, "text", None) or {}  # only PNG has text chunks
    except ValueError:  # Pillow refuses oversized text chunks; the pixels still carry the data
        return None
    value = chunks.get(TEXT_CHUNK_KEY)
    return value if isinstance(value, str) else None

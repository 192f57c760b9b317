"""What an embedding file holds, in lines a person reads (`tiflow inspect`)."""
from __future__ import annotations

from pathlib import Path

from stages.common.embedding.core import describe_widths_origin
from stages.common.embedding.read import EmbeddingFile, open_embedding_file
from stages.common.trigger import NEGATIVE_SUFFIX  # DreamArtist's APT pair: {name} in the prompt, {name}-neg in the negative prompt


def describe_embedding_file(file: EmbeddingFile) -> list[str]:
    """format, name, vectors, widths, family, step, checkpoint and per-vector norms, one fact a line."""
    embedding = file.embedding
    widths = ", ".join(f"{key} {embedding.vectors[key].shape[1]}" for key in embedding.encoder_keys)
    lines = [
        f"file:       {file.path}",
        f"format:     {file.format}",
        f"name:       {embedding.name}",
        f"vectors:    {embedding.vector_count}",
        f"width:      {widths}",
        f"family:     {describe_widths_origin(embedding.widths)}",
        f"step:       {embedding.step}",
    ]
    if embedding.checkpoint_hash or embedding.checkpoint_name:
        lines.append(f"checkpoint: {embedding.checkpoint_name or '?'} [{embedding.checkpoint_hash or '?'}]")
    for key in embedding.encoder_keys:
        norms = " ".join(f"{norm:.4g}" for norm in embedding.vectors[key].norm(dim=1).tolist())
        lines.append(f"norms:      {key}: {norms}")
    partner = apt_partner(Path(file.path))
    if partner is not None:
        role, path = partner
        other = open_embedding_file(path).embedding
        lines.append(f"APT pair:   this is the {role} embedding; its partner is {path.name} ({other.vector_count} vectors, step {other.step}): "
                     f"write {embedding.name if role == 'positive' else other.name} in the prompt and "
                     f"{other.name if role == 'positive' else embedding.name} in the negative prompt")
    return lines


def apt_partner(path: Path) -> tuple[str, Path] | None:
    """("positive" | "negative", the other file) when `path` has a DreamArtist partner beside it in the same format."""
    if path.stem.endswith(NEGATIVE_SUFFIX):
        other = path.with_name(path.stem.removesuffix(NEGATIVE_SUFFIX) + path.suffix)
        return ("negative", other) if other.is_file() else None
    other = path.with_name(path.stem + NEGATIVE_SUFFIX + path.suffix)
    return ("positive", other) if other.is_file() else None

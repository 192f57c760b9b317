"""What an embedding file holds, in lines a person reads (`tiflow inspect`)."""
from __future__ import annotations

from stages.common.embedding.core import describe_widths_origin
from stages.common.embedding.read import EmbeddingFile


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
    return lines

"""Embedding files: write the formats AUTOMATIC1111/Forge, ComfyUI, kohya and diffusers load."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from stages.common.families import Family
from stages.common.files import atomic_path


@dataclass
class Embedding:
    """A trained embedding: one [vectors, width] tensor per text encoder of the family."""

    name: str
    vectors: dict[str, torch.Tensor]  # embedding-file key (emb_params | clip_l | clip_g) → tensor
    step: int = 0
    checkpoint_hash: str | None = None
    checkpoint_name: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, name: str, family: Family, tensors: list[torch.Tensor], **info) -> "Embedding":
        keys = [slot.embedding_key for slot in family.text_encoders]
        return cls(name=name, vectors={k: t.detach().float().cpu().contiguous() for k, t in zip(keys, tensors)}, **info)


def _check_finite(embedding: Embedding) -> None:
    for key, tensor in embedding.vectors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"embedding {embedding.name!r} ({key}) holds NaN or inf values; refusing to write it")


def save_safetensors(embedding: Embedding, path: Path) -> None:
    """`{run}.safetensors`: `emb_params` (SD1/2) or `clip_l` + `clip_g` (SDXL), fp32, with name/step metadata."""
    _check_finite(embedding)
    metadata = {"name": embedding.name, "step": str(embedding.step)}
    if embedding.checkpoint_hash:
        metadata["sd_checkpoint"] = embedding.checkpoint_hash
    if embedding.checkpoint_name:
        metadata["sd_checkpoint_name"] = embedding.checkpoint_name
    with atomic_path(path) as temp:
        save_file(dict(embedding.vectors), str(temp), metadata=metadata)


def save_a1111_pt(embedding: Embedding, path: Path) -> None:
    """AUTOMATIC1111's `.pt` dict, in torch's legacy (non-zip) serialization.

    AUTOMATIC1111's allow-list unpickler rejects the `.format_version`/`.storage_alignment`
    entries that recent torch writes into zip archives; the legacy format has none.
    """
    _check_finite(embedding)
    if "emb_params" in embedding.vectors:
        param = embedding.vectors["emb_params"]
    else:  # SDXL in .pt: AUTOMATIC1111 reads the two per-encoder tensors from the dict itself
        param = None
    payload = {
        "string_to_token": {"*": 265},  # AUTOMATIC1111 writes the id of '*' here; kept for compatibility
        "string_to_param": {"*": param} if param is not None else {},
        "name": embedding.name,
        "step": embedding.step,
        "sd_checkpoint": embedding.checkpoint_hash,
        "sd_checkpoint_name": embedding.checkpoint_name,
    }
    if param is None:
        payload.update(embedding.vectors)
    with atomic_path(path) as temp:
        torch.save(payload, temp, _use_new_zipfile_serialization=False)


def save_embedding_files(embedding: Embedding, folder: Path, stem: str) -> list[Path]:
    """Write every format for one embedding into `folder`; return the paths written."""
    paths = [folder / f"{stem}.safetensors", folder / f"{stem}.pt"]
    save_safetensors(embedding, paths[0])
    save_a1111_pt(embedding, paths[1])
    return paths

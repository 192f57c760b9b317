"""Embedding files: the record, and the writers for what AUTOMATIC1111/Forge, ComfyUI, kohya and diffusers load.

Readers live in embedding_read.py, the AUTOMATIC1111 PNG format in embedding_png.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from stages.common.families import FAMILIES, Family, family_for_widths
from stages.common.files import atomic_path
from stages.common.errors import InputError

SD_KEYS = ("emb_params",)  # SD1/SD2: one tensor (AUTOMATIC1111/ComfyUI/kohya key)
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL: one tensor per text encoder, in text-encoder order
A1111_STAR_TOKEN = 265  # the id of '*' that AUTOMATIC1111 writes into string_to_token


class EmbeddingError(InputError):
    """An embedding file or tensor that cannot be used; the message names the file and the reason."""


@dataclass
class Embedding:
    """A trained embedding: one [vectors, width] tensor per text encoder of the family."""

    name: str
    vectors: dict[str, torch.Tensor]  # embedding-file key (emb_params | clip_l | clip_g) → tensor
    step: int = 0
    checkpoint_hash: str | None = None
    checkpoint_name: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return "clip_l" in self.vectors

    @property
    def encoder_keys(self) -> tuple[str, ...]:
        """The tensor keys in text-encoder order."""
        return SDXL_KEYS if self.is_sdxl else SD_KEYS

    @property
    def vector_count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        """Vector width per text encoder, in text-encoder order."""
        return tuple(self.vectors[key].shape[1] for key in self.encoder_keys)


def describe_widths_origin(widths: tuple[int, ...]) -> str:
    """Which family an embedding of these widths was made for, in words (for error messages and inspect)."""
    names = family_for_widths(widths)
    if names:
        return " or ".join(f"{name} ({FAMILIES[name].description})" for name in names)
    shown = " + ".join(str(w) for w in widths)
    return f"no known family (width {shown} matches no full-size SD1/SD2/SDXL text encoder; a tiny test model?)"


def check_embedding(embedding: Embedding, source: str) -> None:
    """Refuse an embedding whose keys, shapes or values cannot work; `source` names the file in messages."""
    keys = set(embedding.vectors)
    if keys not in (set(SD_KEYS), set(SDXL_KEYS)):
        raise EmbeddingError(
            f"{source}: holds tensors {sorted(keys)}; an embedding holds either emb_params (SD1/SD2) or clip_l + clip_g (SDXL)"
        )
    for key, tensor in embedding.vectors.items():
        if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
            raise EmbeddingError(f"{source}: {key} has shape {list(tensor.shape)}; embedding vectors are [vectors, width]")
        if not tensor.is_floating_point():
            raise EmbeddingError(f"{source}: {key} holds {tensor.dtype} values; embedding vectors are floating point")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise EmbeddingError(
                f"{source}: {key} holds {bad} NaN/inf values out of {tensor.numel()}; the training that made it "
                "diverged. Use an earlier snapshot (steps/) or retrain with a lower learning rate"
            )
    counts = {key: t.shape[0] for key, t in embedding.vectors.items()}
    if len(set(counts.values())) > 1:
        raise EmbeddingError(f"{source}: the text encoders have different vector counts {counts}; SDXL embeddings need the same count for clip_l and clip_g")


def check_embedding_fits(embedding: Embedding, family: Family, widths: tuple[int, ...], source: str) -> None:
    """Refuse an embedding that does not fit a model of `family` whose text encoders are `widths` wide."""
    expected = tuple(slot.embedding_key for slot in family.text_encoders)
    if set(expected) != set(embedding.vectors):
        raise EmbeddingError(
            f"{source}: holds {' + '.join(embedding.encoder_keys)} (made for {describe_widths_origin(embedding.widths)}), "
            f"but the {family.name} model takes {' + '.join(expected)}; use an embedding trained on a {family.name} model"
        )
    for key, model_width in zip(expected, widths):
        width = embedding.vectors[key].shape[1]
        if width != model_width:
            raise EmbeddingError(
                f"{source}: its {key} vectors are {width} wide, but the model's text encoder is {model_width} wide "
                f"({family.name} model); the embedding was made for {describe_widths_origin(embedding.widths)}. "
                f"Use an embedding trained on a {family.name} model"
            )


# --------------------------------------------------------------------------------------------- writers


def a1111_payload(embedding: Embedding) -> dict:
    """The dict AUTOMATIC1111 stores in .pt files and PNG embeddings.

    SDXL embeddings are the bare {clip_g, clip_l} dict: AUTOMATIC1111 turns every value of an SDXL
    dict into a tensor, so name/step entries would make it refuse the file.
    """
    check_embedding(embedding, f"embedding {embedding.name!r}")
    if embedding.is_sdxl:
        return {"clip_g": embedding.vectors["clip_g"], "clip_l": embedding.vectors["clip_l"]}
    return {
        "string_to_token": {"*": A1111_STAR_TOKEN},
        "string_to_param": {"*": embedding.vectors["emb_params"]},
        "name": embedding.name,
        "step": embedding.step,
        "sd_checkpoint": embedding.checkpoint_hash,
        "sd_checkpoint_name": embedding.checkpoint_name,
    }


def save_legacy_pickle(payload: object, path: Path) -> None:
    """torch.save in the legacy (non-zip) serialization.

    AUTOMATIC1111's allow-list unpickler rejects the `.format_version`/`.storage_alignment`
    entries that recent torch writes into zip archives; the legacy format has none, and
    `torch.load(weights_only=True)` (ComfyUI, diffusers) reads it too.
    """
    with atomic_path(path) as temp:
        torch.save(payload, temp, _use_new_zipfile_serialization=False)


def save_safetensors(embedding: Embedding, path: Path) -> list[Path]:
    """`{run}.safetensors`: `emb_params` (SD1/2) or `clip_l` + `clip_g` (SDXL), fp32, with name/step metadata."""
    check_embedding(embedding, f"embedding {embedding.name!r}")
    metadata = {"name": embedding.name, "step": str(embedding.step)}
    if embedding.checkpoint_hash:
        metadata["sd_checkpoint"] = embedding.checkpoint_hash
    if embedding.checkpoint_name:
        metadata["sd_checkpoint_name"] = embedding.checkpoint_name
    with atomic_path(path) as temp:
        save_file({key: embedding.vectors[key].contiguous() for key in embedding.encoder_keys}, str(temp), metadata=metadata)
    return [Path(path)]


def save_a1111_pt(embedding: Embedding, path: Path) -> list[Path]:
    """AUTOMATIC1111's `.pt` dict (see a1111_payload), in torch's legacy serialization."""
    save_legacy_pickle(a1111_payload(embedding), path)
    return [Path(path)]


def diffusers_paths(embedding: Embedding, path: Path) -> list[Path]:
    """Where save_diffusers writes: `path`, plus `<stem>_2<suffix>` for SDXL's second text encoder.

    The `_2` file mirrors diffusers' own SDXL script (learned_embeds.safetensors, learned_embeds_2.safetensors).
    """
    path = Path(path)
    if not embedding.is_sdxl:
        return [path]
    return [path, path.with_name(f"{path.stem}_2{path.suffix}")]


def save_diffusers(embedding: Embedding, path: Path) -> list[Path]:
    """diffusers `learned_embeds`: `{token: [vectors, width]}`, one file per text encoder.

    `.safetensors` → safetensors; any other suffix (`.bin`) → a legacy-format pickle. For SDXL the
    first file is clip_l (text_encoder/tokenizer), the `_2` file clip_g (text_encoder_2/tokenizer_2).
    """
    check_embedding(embedding, f"embedding {embedding.name!r}")
    paths = diffusers_paths(embedding, path)
    for key, target in zip(embedding.encoder_keys, paths):
        state = {embedding.name: embedding.vectors[key].contiguous()}
        if target.suffix.lower() == ".safetensors":
            with atomic_path(target) as temp:
                save_file(state, str(temp))
        else:
            save_legacy_pickle(state, target)
    return paths


def save_embedding_files(embedding: Embedding, folder: Path, stem: str) -> list[Path]:
    """Write every format for one embedding into `folder`; return the paths written."""
    return save_safetensors(embedding, folder / f"{stem}.safetensors") + save_a1111_pt(embedding, folder / f"{stem}.pt")

"""Where an embedding starts: its init text, or an existing embedding file (keeping its step count)."""
from __future__ import annotations

import torch

from stages.common.embedding_read import read_embedding_for_model
from stages.common.models import ModelBundle


def starting_point(settings, bundle: ModelBundle) -> tuple[torch.Tensor | None, int]:
    """(start vectors or None for init_text, the step count to continue from)."""
    if not settings.init_from:
        return None, 0
    # any format tiflow reads; a width that does not fit names both widths and the file's family
    embedding = read_embedding_for_model(settings.init_from, bundle.family, (bundle.text_width,))
    vectors = embedding.vectors[bundle.family.text_encoders[0].embedding_key]
    if vectors.shape[0] != settings.vectors:
        raise ValueError(f"train.init_from: {settings.init_from} has {vectors.shape[0]} vectors; set vectors: {vectors.shape[0]} for this run")
    return vectors.float(), embedding.step

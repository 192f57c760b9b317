"""The resume store: full training state, kept outside Snakemake's outputs, keyed by what it depends on.

Snakemake deletes a job's outputs before rerunning it; the state lives in
{out_dir}/cache/train/{run}/{key}/state.pt so an interrupted or pre-empted run continues where
it stopped, and a finished run whose files were deleted is rewritten without training again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from stages.common.files import atomic_path, hash_file

log = logging.getLogger(__name__)

# settings that change what is learned; the rest (steps, saving, previews) may change and still resume
_RESUME_INSENSITIVE = {"name", "steps", "save_every", "preview_every", "preview", "tensorboard", "max_nan_steps", "compile"}


def resume_key(settings: dict, model_identity: str, family: str, clip_skip: int, latents_manifest: Path, captions_table: Path) -> str:
    """The state folder's name: a hash of everything that changes what this training learns.

    Besides the run's own settings: the model's weights, the family it is trained as (the same
    file trains differently as sd2 and sd2-v), the text-encoder layer (clip_skip), the content of
    the init_from file (not its path: a replaced file is a new start), the latents and the captions.
    """
    relevant = {k: v for k, v in sorted(settings.items()) if k not in _RESUME_INSENSITIVE}
    if relevant.get("init_from"):
        relevant["init_from"] = hash_file(relevant["init_from"])
    parts = [json.dumps(relevant, sort_keys=True, default=str), model_identity, family, str(clip_skip),
             hash_file(latents_manifest), hash_file(captions_table)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class ResumeStore:
    """One run's saved state: save atomically, load only what torch can read without running code."""

    def __init__(self, folder: Path | None):
        self.path = folder / "state.pt" if folder else None

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged state must not block training: start over, say so
            log.warning("could not read the resume state %s (%s); training starts from step 0", self.path, exc)
            return None

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        with atomic_path(self.path) as temp:
            torch.save(state, temp)

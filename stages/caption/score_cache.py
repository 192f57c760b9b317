"""Tagger scores kept between runs, keyed by image content and model file, outside Snakemake's outputs.

A changed threshold, exclusion or order re-captions from these scores without running the
model; a new image runs the model for that image only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.common.files import atomic_path

log = logging.getLogger(__name__)


class ScoreCache:
    """One float32 vector per image in {root}/{model hash}/{image hash}.npy."""

    def __init__(self, root: Path, model_hash: str):
        self.folder = root / model_hash[:16]

    def path_for(self, image_hash: str) -> Path:
        return self.folder / f"{image_hash}.npy"

    def load(self, image_hash: str) -> np.ndarray | None:
        path = self.path_for(image_hash)
        if not path.is_file():
            return None
        try:
            scores = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:  # a damaged entry is recomputed, not trusted
            log.warning("tagger cache entry %s is unreadable (%s); the image is tagged again", path, exc)
            return None
        if scores.ndim != 1 or scores.dtype != np.float32:
            log.warning("tagger cache entry %s holds %s %s, not a score vector; the image is tagged again", path, scores.dtype, scores.shape)
            return None
        return scores

    def save(self, image_hash: str, scores: np.ndarray) -> None:
        with atomic_path(self.path_for(image_hash)) as temp, open(temp, "wb") as handle:
            np.save(handle, np.asarray(scores, dtype=np.float32))

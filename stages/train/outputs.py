"""What a run leaves in train/{run}/: the embedding in every format, step snapshots, loss.csv."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd

from stages.common.embedding import Embedding, save_embedding_files
from stages.common.files import write_csv_atomic

log = logging.getLogger(__name__)

LOSS_COLUMNS = ["step", "loss", "lr", "images_per_s"]


class RunOutputs:
    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name

    def save_snapshot(self, embedding: Embedding, step: int) -> None:
        save_embedding_files(embedding, self.folder / "steps", f"{self.name}-{embedding.step}")

    def write_loss_log(self, rows: list[dict]) -> None:
        write_csv_atomic(self.folder / "loss.csv", pd.DataFrame(rows, columns=LOSS_COLUMNS))

    def save_final(self, embedding: Embedding, rows: list[dict]) -> None:
        self.write_loss_log(rows)
        save_embedding_files(embedding, self.folder, self.name)

    def set_aside_earlier_snapshots(self) -> Path | None:
        """Move snapshots an earlier training left in steps/ into steps/earlier-<time>/; return that folder.

        Snakemake deletes only the declared outputs, so a retrained run (new learning rate, new
        vectors) would otherwise mix its snapshots with the last training's, and evaluate would
        score both as one run. Nothing is deleted: the old files stay in the subfolder.
        """
        steps = self.folder / "steps"
        earlier = sorted(p for p in steps.glob(f"{self.name}-*") if p.is_file()) if steps.is_dir() else []
        if not earlier:
            return None
        target = steps / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while target.exists():
            target, suffix = steps / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
        target.mkdir()
        for path in earlier:
            path.rename(target / path.name)
        log.info("%d snapshot files of an earlier training moved to %s", len(earlier), target)
        return target

    def preview_path(self, step: int) -> Path:
        return self.folder / "previews" / f"{self.name}-{step}.png"

"""What a run leaves in train/{run}/: the embedding in every format, step snapshots, loss.csv."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.common.embedding import Embedding, save_embedding_files
from stages.common.files import write_csv_atomic

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

    def preview_path(self, step: int) -> Path:
        return self.folder / "previews" / f"{self.name}-{step}.png"

"""What a run leaves in train/{run}/: the embedding in every format, step snapshots, loss.csv.

steps/ holds the regular checkpoints of the current training, every save_every steps and the
final one; evaluate scores those. A stop signal's snapshot goes to interrupted/ instead, since it
falls at no regular step. A new training moves both into steps/earlier-<time>/, so nothing an
earlier training made is lost, its final embedding included.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import pandas as pd

from stages.common.embedding.core import Embedding, save_embedding_files
from stages.common.files import write_csv_atomic
from stages.common.layout import latest_snapshot

log = logging.getLogger(__name__)

LOSS_COLUMNS = ["step", "loss", "lr", "images_per_s"]


class RunOutputs:
    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name

    def save_snapshot(self, embedding: Embedding) -> None:
        """steps/{name}.*: a snapshot is named {run}-{step} (APT's negative: {run}-{step}-neg)."""
        save_embedding_files(embedding, self.folder / "steps", embedding.name)

    def save_interrupted(self, embedding: Embedding) -> None:
        save_embedding_files(embedding, self.folder / "interrupted", embedding.name)

    def write_loss_log(self, rows: list[dict]) -> None:
        write_csv_atomic(self.folder / "loss.csv", pd.DataFrame(rows, columns=LOSS_COLUMNS))

    def append_loss_row(self, row: dict) -> None:
        """One more line in loss.csv as each step ends, so it can be watched (save points rewrite it whole)."""
        with open(self.folder / "loss.csv", "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([row[column] for column in LOSS_COLUMNS])

    def save_final(self, embeddings: list[Embedding], snapshots: list[Embedding], rows: list[dict]) -> None:
        """{run}.* and, as snapshots (named {run}-{step}), steps/{run}-{step}.*: the final step is a checkpoint too.

        With APT the lists also hold {run}-neg; the run's own {run}.safetensors, the file Snakemake
        waits for, is written last, so its presence means the pair is complete.
        """
        self.write_loss_log(rows)
        for snapshot in snapshots:
            self.save_snapshot(snapshot)
        for embedding in reversed(embeddings):
            save_embedding_files(embedding, self.folder, embedding.name)

    def set_aside_earlier_snapshots(self) -> Path | None:
        """Move the files an earlier training left in steps/ and interrupted/ into steps/earlier-<time>/; return that folder.

        Snakemake deletes only the declared outputs, so a retrained run (new learning rate, new
        vectors) would otherwise mix its snapshots with the last training's, and evaluate would
        score both as one run. Nothing is deleted: the old files, the last training's final
        embedding among them, stay in the subfolder, and the log names them.
        """
        steps, interrupted = self.folder / "steps", self.folder / "interrupted"
        earlier = sorted(p for folder in (steps, interrupted) if folder.is_dir() for p in folder.glob(f"{self.name}-*") if p.is_file())
        if not earlier:
            return None
        target = steps / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while target.exists():
            target, suffix = steps / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}", suffix + 1
        target.mkdir(parents=True)
        for path in earlier:
            destination = target / path.name if path.parent == steps else target / "interrupted" / path.name
            destination.parent.mkdir(exist_ok=True)
            path.rename(destination)
        final = latest_snapshot(target, self.name)
        log.warning("a new training of %s starts; the earlier training's %d files are kept in %s%s", self.name, len(earlier), target,
                    f" (its last checkpoint: {final.name})" if final else "")
        return target

    def preview_path(self, step: int) -> Path:
        return self.folder / "previews" / f"{self.name}-{step}.png"


"""The out/ folder's layout, in one place: the Snakefile and every stage ask StageDirs where things go.

Declared outputs (what Snakemake deletes before a rerun) sit in each stage's folder; what must
survive reruns (per-image caches, training state) sits under cache/, keyed by content.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageDirs:
    out_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))

    @property
    def preprocess(self) -> Path:
        return self.out_dir / "preprocess"

    @property
    def preprocess_cache(self) -> Path:
        return self.out_dir / "cache" / "preprocess"

    @property
    def caption(self) -> Path:
        return self.out_dir / "caption"

    @property
    def tagger_store(self) -> Path:
        return self.out_dir / "cache" / "tagger"

    @property
    def latents(self) -> Path:
        return self.out_dir / "latents"

    @property
    def latent_store(self) -> Path:
        return self.out_dir / "cache" / "latents"

    def train(self, run: str) -> Path:
        return self.out_dir / "train" / run

    def train_state(self, run: str) -> Path:
        """The resume store of a run: full training state, outside train's declared outputs."""
        return self.out_dir / "cache" / "train" / run

    @property
    def evaluate_root(self) -> Path:
        return self.out_dir / "evaluate"

    def evaluate(self, run: str) -> Path:
        return self.evaluate_root / run

    def log(self, job: str) -> Path:
        return self.out_dir / "logs" / f"{job}.log"


def run_files(train_dir: Path, run: str) -> dict[str, Path]:
    """The files train leaves for a run, by role (train/{run}/ as SPEC §1 lays it out)."""
    return {"embedding": train_dir / f"{run}.safetensors", "a1111": train_dir / f"{run}.pt", "loss": train_dir / "loss.csv",
            "steps": train_dir / "steps", "interrupted": train_dir / "interrupted"}


def latest_snapshot(folder: Path, name: str) -> Path | None:
    """The highest-step {name}-{step}.safetensors in `folder` (an earlier training's final embedding), if any."""
    steps = {}
    for path in folder.glob(f"{name}-*.safetensors"):
        tail = path.stem[len(name) + 1:]
        if tail.isdigit():
            steps[int(tail)] = path
    return steps[max(steps)] if steps else None


def frame_size(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """preprocess.size as (width, height): a square side or a [width, height] pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

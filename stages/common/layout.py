"""The out/ folder's layout, in one place: the Snakefile and every stage ask StageDirs where things go.

Declared outputs (what Snakemake deletes before a rerun) sit in each stage's folder; what must
survive reruns (per-image caches, training state) sits under cache/, keyed by content.
"""
from __future__ import annotations

from pathlib import Path


PIXELS_PER_LATENT = 8  # every Stable Diffusion VAE shrinks each side 8 times


class StageDirs:
    """Where each stage's files go under out_dir."""

    def __init__(self, out_dir: str | Path):
        root = self.out_dir = Path(out_dir)
        self.preprocess, self.preprocess_cache = root / "preprocess", root / "cache" / "preprocess"
        self.caption, self.tagger_store = root / "caption", root / "cache" / "tagger"
        self.latents, self.latent_store = root / "latents", root / "cache" / "latents"
        self.evaluate_root, self.logs = root / "evaluate", root / "logs"
        self.preflight, self.preflight_cache = root / "preflight", root / "cache" / "preflight"

    def train(self, run: str) -> Path:
        return self.out_dir / "train" / run

    def train_state(self, run: str) -> Path:
        """The resume store of a run: full training state, outside train's declared outputs."""
        return self.out_dir / "cache" / "train" / run

    def evaluate(self, run: str) -> Path:
        return self.evaluate_root / run

    def log(self, job: str) -> Path:
        return self.logs / f"{job}.log"


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

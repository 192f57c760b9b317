"""The evaluate stage's outputs for one run: grid.png and loss.png."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd

from stages.common.files import atomic_path
from stages.common.models import ModelBundle
from stages.evaluate.grid import build_embedding_pipeline, compose_grid, render_samples


def plot_loss(loss_csv: Path, target: Path) -> None:
    """Training loss per step with a moving average, the curve users watch for overtraining."""
    table = pd.read_csv(loss_csv)
    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=100)
    axis.plot(table.step, table.loss, alpha=0.35, label="loss")
    window = max(1, len(table) // 20)
    axis.plot(table.step, table.loss.rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    with atomic_path(target) as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)


def evaluate_run(bundle: ModelBundle, train_dir: Path, run: str, trigger: str, section: dict, size: tuple[int, int], out_dir: Path) -> Path:
    """Write out_dir/grid.png (prompts × seeds with the final embedding) and loss.png; return the grid path."""
    embedding_file = train_dir / f"{run}.safetensors"
    if not embedding_file.is_file():
        raise FileNotFoundError(f"{embedding_file} does not exist; run the train stage for {run!r} first")
    prompts = [p.replace("[name]", trigger) for p in section["prompts"]]
    pipeline = build_embedding_pipeline(bundle, embedding_file, trigger)
    rows = render_samples(pipeline, prompts, section["seeds"], size, section["steps"], section["guidance_scale"])
    grid = compose_grid(rows, prompts, section["seeds"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "grid.png") as temp:
        grid.save(temp, format="PNG")
    if (train_dir / "loss.csv").is_file():
        plot_loss(train_dir / "loss.csv", out_dir / "loss.png")
    return out_dir / "grid.png"

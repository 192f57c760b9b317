"""Charts written as PNG files (matplotlib, no display): lines over training steps, and plain ones."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from stages.common.files import atomic_path


@contextmanager
def step_chart(target: Path, ylabel: str) -> Iterator[plt.Axes]:
    """Axes to draw lines on (x: step); on exit, a legend is added and the chart saved atomically to `target`."""
    with chart(target, "step", ylabel) as axis:
        yield axis
        axis.legend()


@contextmanager
def chart(target: Path, xlabel: str, ylabel: str, size: tuple[float, float] = (7, 3.5)) -> Iterator[plt.Axes]:
    """Axes to draw on; on exit, the labels are set and the chart saved atomically to `target`."""
    figure, axis = plt.subplots(figsize=size, dpi=100)
    try:
        yield axis
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        figure.tight_layout()
        with atomic_path(target) as temp:
            figure.savefig(temp, format="png")
    finally:
        plt.close(figure)

"""Line charts over training steps, written as PNG files (matplotlib, no display)."""
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
    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        yield axis
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.legend()
        figure.tight_layout()
        with atomic_path(target) as temp:
            figure.savefig(temp, format="png")
    finally:
        plt.close(figure)

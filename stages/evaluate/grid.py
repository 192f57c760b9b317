"""Sample grids for a trained embedding: prompts × seeds, or checkpoints × seeds."""
from __future__ import annotations

from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from stages.common.errors import InputError
from stages.common.sampling import sample_image
from stages.common.textual_inversion import PromptConditioning

LABEL_HEIGHT = 18


def render_samples(
    pipeline: DiffusionPipeline,
    prompts: list[PromptConditioning],
    negative: PromptConditioning,
    seeds: list[int],
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
) -> list[list[Image.Image]]:
    """One image per (prompt, seed): rows are prompts, columns are seeds."""
    return [[sample_image(pipeline, seed, size, steps, guidance_scale, prompt, negative) for seed in seeds] for prompt in prompts]


def compose_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """Paste the images into one labelled grid: a label above each row, the column's label (a seed, a step) on each image."""
    cell_w, cell_h = rows[0][0].size
    grid = Image.new("RGB", (cell_w * len(column_labels), (cell_h + LABEL_HEIGHT) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, row) in enumerate(zip(row_labels, rows)):
        top = r * (cell_h + LABEL_HEIGHT)
        draw.text((4, top + 3), label, fill="black")
        for c, (column, image) in enumerate(zip(column_labels, row)):
            grid.paste(image, (c * cell_w, top + LABEL_HEIGHT))
            draw.text((c * cell_w + 4, top + LABEL_HEIGHT + 4), column, fill="white", stroke_width=1, stroke_fill="black")
    return grid


def seed_labels(seeds: list[int]) -> list[str]:
    return [f"seed {seed}" for seed in seeds]


def grid_steps(steps: list[int], chosen: list[int], count: int, best: int, where: str = "evaluate.grid_steps") -> list[int]:
    """The checkpoints the baseline grid shows: evaluate.grid_steps when given, else `count` spread ones (best and last included)."""
    if not chosen:
        return spread_steps(steps, count, best)
    missing = [step for step in chosen if step not in steps]
    if missing:
        raise InputError(f"{where}: no checkpoint at step {', '.join(map(str, missing))}; the run saved steps {', '.join(map(str, steps))}")
    return sorted(set(chosen))


def spread_steps(steps: list[int], count: int, must_include: int) -> list[int]:
    """Up to `count` steps spread evenly from first to last, always with the last and `must_include`."""
    if count <= 0 or not steps:
        return []
    if len(steps) <= count:
        return list(steps)
    picked = {steps[round(i * (len(steps) - 1) / max(1, count - 1))] for i in range(count)}
    picked.add(must_include)
    while len(picked) > count:  # the best step pushed one over: drop the evenly picked one nearest to it
        picked.remove(min((s for s in picked if s not in (must_include, steps[-1])), key=lambda s: abs(s - must_include)))
    return sorted(picked)

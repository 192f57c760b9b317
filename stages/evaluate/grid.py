"""Sample images with a trained embedding, loaded the way users load it (diffusers' own loader)."""
from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from stages.common.models import ModelBundle
from stages.common.sampling import build_pipeline, sample_image


def build_embedding_pipeline(bundle: ModelBundle, embedding_file: Path, trigger: str) -> StableDiffusionPipeline:
    """A txt2img pipeline with the embedding loaded by diffusers' load_textual_inversion."""
    pipeline = build_pipeline(bundle)
    pipeline.load_textual_inversion(str(embedding_file), token=trigger)
    return pipeline


def render_samples(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
) -> list[list[Image.Image]]:
    """One image per (prompt, seed): rows are prompts, columns are seeds."""
    return [[sample_image(pipeline, seed, size, steps, guidance_scale, prompt=prompt) for seed in seeds] for prompt in prompts]


def compose_grid(rows: list[list[Image.Image]], prompts: list[str], seeds: list[int]) -> Image.Image:
    """Paste the images into one labelled grid: prompt above each row, seed on each image."""
    cell_w, cell_h = rows[0][0].size
    label_h = 18
    grid = Image.new("RGB", (cell_w * len(seeds), (cell_h + label_h) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, row) in enumerate(zip(prompts, rows)):
        top = r * (cell_h + label_h)
        draw.text((4, top + 3), prompt, fill="black")
        for c, (seed, image) in enumerate(zip(seeds, row)):
            grid.paste(image, (c * cell_w, top + label_h))
            draw.text((c * cell_w + 4, top + label_h + 4), f"seed {seed}", fill="white", stroke_width=1, stroke_fill="black")
    return grid

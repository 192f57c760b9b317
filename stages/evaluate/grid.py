"""Sample images with a trained embedding, loaded the way users load it (diffusers' own loader)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw

from stages.common.models import ModelBundle

log = logging.getLogger(__name__)


def build_pipeline(bundle: ModelBundle, embedding_file: Path, trigger: str) -> StableDiffusionPipeline:
    """A txt2img pipeline over the frozen model with the embedding loaded by diffusers' load_textual_inversion."""
    pipeline = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=DDIMScheduler.from_config(bundle.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
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
    rows = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            result = pipeline(prompt, width=size[0], height=size[1], num_inference_steps=steps,
                              guidance_scale=guidance_scale, generator=generator)
            row.append(result.images[0])
        rows.append(row)
    return rows


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

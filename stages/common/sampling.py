"""txt2img over a frozen model: evaluate's grids and train's previews share it."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from stages.common.models import ModelBundle


def build_pipeline(bundle: ModelBundle) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over the bundle's own modules (no copies), DDIM sampler, no safety checker."""
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
    return pipeline


@torch.no_grad()
def sample_image(
    pipeline: StableDiffusionPipeline,
    seed: int,
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
) -> Image.Image:
    """One image for a prompt (text, or ready-made context embeddings) and a seed."""
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the same image on any device
    result = pipeline(
        prompt=prompt,
        negative_prompt=negative_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
    )
    return result.images[0]

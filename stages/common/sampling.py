"""txt2img over a frozen model: evaluate's grids and train's previews share it."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from stages.common.models import ModelBundle
from stages.common.textual_inversion import PromptConditioning


def build_pipeline(bundle: ModelBundle) -> DiffusionPipeline:
    """diffusers' pipeline for the family over the bundle's own modules (no copies), DDIM sampler.

    SDXL gets StableDiffusionXLPipeline, which adds the size conditioning of an uncropped image
    at the rendered size, as generating with SDXL does.
    """
    scheduler = DDIMScheduler.from_config(bundle.scheduler.config)
    if bundle.family.size_conditioning:
        pipeline = StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoder, text_encoder_2=bundle.text_encoder_2, tokenizer=bundle.tokenizer,
            tokenizer_2=bundle.tokenizer_2, unet=bundle.unet, scheduler=scheduler, add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=bundle.unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def sample_image(
    pipeline: DiffusionPipeline,
    seed: int,
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
    positive: PromptConditioning,
    negative: PromptConditioning,
) -> Image.Image:
    """One image for a prompt's conditioning (from tiflow's own encoder, so the vectors act as trained) and a seed."""
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the same image on any device
    pooled = {}
    if positive.pooled is not None:
        pooled = {"pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled}
    result = pipeline(
        prompt_embeds=positive.context,
        negative_prompt_embeds=negative.context,
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        **pooled,
    )
    return result.images[0]

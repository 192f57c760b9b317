"""Stable Diffusion model families as data: everything the stages do differently per family.

The trainer, the cache and the embedding code read these rows instead of branching on names.
"""
from __future__ import annotations

from dataclasses import dataclass
from stages.common.errors import InputError


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family and the key its vectors carry in an embedding file."""

    component: str  # the diffusers component name: text_encoder | text_encoder_2 (and tokenizer | tokenizer_2)
    embedding_key: str  # key in {run}.safetensors (AUTOMATIC1111/ComfyUI convention)
    width: int  # hidden size of the full-size encoder; tiny builtins are narrower
    pad_with_eos: bool  # CLIP-L pads prompts with <|endoftext|>, OpenCLIP with "!" (id 0)
    pooled: bool = False  # SDXL: this encoder's projected end-of-text state is the UNet's pooled text input


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    text_encoders: tuple[TextEncoderSlot, ...]
    prediction_type: str  # "epsilon" or "v_prediction": what the UNet is trained to predict
    resolution: int  # native training side in pixels
    vae_scaling_factor: float  # latents are multiplied by this before the UNet sees them
    penultimate_layer: bool  # SDXL conditions on hidden_states[-2] without the final norm
    a1111_clip_skip: bool  # AUTOMATIC1111/Forge apply the Clip skip setting to this family (not to SD 2.x or, by default, SDXL)
    size_conditioning: bool  # SDXL: the UNet also takes add_time_ids (original size, crop, target size) and the pooled prompt


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("sd1", "Stable Diffusion 1.x (CLIP ViT-L/14)", (TextEncoderSlot("text_encoder", "emb_params", 768, True),),
               "epsilon", 512, 0.18215, False, True, False),
        Family("sd2", "Stable Diffusion 2.x base (OpenCLIP ViT-H/14, epsilon)", (TextEncoderSlot("text_encoder", "emb_params", 1024, False),),
               "epsilon", 512, 0.18215, False, False, False),
        Family("sd2-v", "Stable Diffusion 2.x 768-v (OpenCLIP ViT-H/14, v-prediction)", (TextEncoderSlot("text_encoder", "emb_params", 1024, False),),
               "v_prediction", 768, 0.18215, False, False, False),
        Family(
            "sdxl",
            "Stable Diffusion XL (CLIP ViT-L + OpenCLIP bigG)",
            (TextEncoderSlot("text_encoder", "clip_l", 768, True), TextEncoderSlot("text_encoder_2", "clip_g", 1280, False, pooled=True)),
            "epsilon",
            1024,
            0.13025,
            True,
            False,
            True,
        ),
    )
}


def clip_skip_warning(family: Family, clip_skip: int) -> str | None:
    """What to tell a user whose clip_skip the usual generator will not apply to this family."""
    if clip_skip == 1 or family.a1111_clip_skip:
        return None
    return (f"model.clip_skip: {clip_skip} on {family.name}: AUTOMATIC1111 and Forge ignore Clip skip for {family.description} models, "
            f"so an embedding trained {clip_skip - 1} layer(s) further from the end will meet another layer there. Keep it only if you "
            "generate with kohya's scripts or ComfyUI's CLIPSetLastLayer at the same setting; set clip_skip: 1 to train for AUTOMATIC1111")


def resolution_warning(family: Family, size: tuple[int, int]) -> str | None:
    """What to tell a user who trains a real checkpoint well below its family's native resolution."""
    if max(size) >= 0.75 * family.resolution:
        return None
    return (f"preprocess.size {size[0]}x{size[1]} is well below the {family.resolution}x{family.resolution} that {family.name} models "
            f"were trained at; an embedding learned on small images renders poorly at full size. Set preprocess.size: {family.resolution} "
            "(with mode: bucket for mixed aspect ratios) unless you generate at this size")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown model family {name!r}; allowed: {', '.join(FAMILIES)} (or 'auto')") from None


def family_for_widths(widths: tuple[int, ...]) -> list[str]:
    """Families whose full-size text encoders have exactly these widths (to name the origin of an embedding)."""
    return [f.name for f in FAMILIES.values() if tuple(s.width for s in f.text_encoders) == widths]

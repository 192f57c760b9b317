"""Preview images during training with the current vectors (AUTOMATIC1111's "save an image every N steps")."""
from __future__ import annotations

from typing import Callable

import torch

from stages.common.embedding.png import save_png_embedding
from stages.common.models import ModelBundle
from stages.common.sampling import build_pipeline, sample_image
from stages.train.outputs import RunOutputs


def make_previewer(bundle: ModelBundle, preview: dict, trigger: str, size: tuple[int, int], outputs: RunOutputs) -> Callable:
    """A callback (model, step) that renders preview.prompt with a fixed seed, sampler steps and CFG."""
    pipeline = build_pipeline(bundle)
    width, height = preview.get("width", size[0]), preview.get("height", size[1])
    prompt = preview["prompt"].replace("[name]", trigger)

    def render(model, step: int) -> None:
        # the context comes from tiflow's own encoder, so the vectors being trained are used as they are now
        with torch.no_grad():
            # APT: the negative embedding leads the negative prompt, as DreamArtist's previews use it
            negative_prompt = ", ".join(filter(None, (model.negative_token, preview["negative_prompt"])))
            positive, negative = model.conditioning([prompt]), model.conditioning([negative_prompt])
        image = sample_image(pipeline, preview["seed"], (width, height), preview["steps"], preview["guidance_scale"], positive, negative)
        # AUTOMATIC1111's "save images with embedding in PNG chunks": the preview is itself a loadable embedding
        save_png_embedding(model.current_embedding(outputs.name, step), outputs.preview_path(step), image=image)

    return render

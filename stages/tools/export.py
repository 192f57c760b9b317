"""Write builtin models in the file layouts real users have: a diffusers folder or one original-layout file."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from stages.common.builtin import build_builtin_components, parse_builtin_name
from stages.common.errors import InputError


def export_diffusers_folder(components: dict, folder: Path) -> Path:
    """Save as a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/, ...), or a
    StableDiffusionXLPipeline one (with text_encoder_2/, tokenizer_2/) for SDXL components.

    Written into a temporary sibling folder first, so an interrupted export leaves nothing half-done.
    """
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder")
    if "text_encoder_2" in components:
        from diffusers import StableDiffusionXLPipeline

        # no watermarker: it needs the invisible-watermark package and only marks generated images
        pipeline = StableDiffusionXLPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], text_encoder_2=components["text_encoder_2"],
            tokenizer=components["tokenizer"], tokenizer_2=components["tokenizer_2"], unet=components["unet"],
            scheduler=components["scheduler"], add_watermarker=False,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
            unet=components["unet"], scheduler=components["scheduler"], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        staging.chmod(0o755)  # mkdtemp makes it private
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def export_builtin(name_or_path: str, folder: Path | None = None, single_file: Path | None = None, half: bool = False) -> list[Path]:
    """`tiflow export-model`: write builtin:<name> (SD1.x, SD2.x or SDXL) as a diffusers folder and/or a single file."""
    name = parse_builtin_name(name_or_path)
    if name is None:
        raise InputError(f"{name_or_path!r} is not a builtin model; write builtin:<name>, e.g. builtin:tiny-sd15")
    if folder is None and single_file is None:
        raise InputError("give an output folder, --single-file FILE.safetensors, or both")
    components = build_builtin_components(name)
    written = []
    if folder is not None:
        written.append(export_diffusers_folder(components, folder))
    if single_file is not None:
        from stages.tools.checkpoint_write import save_original_checkpoint

        if single_file.suffix != ".safetensors":
            raise InputError(f"--single-file {single_file}: write a .safetensors file (pickled .ckpt files are not written)")
        save_original_checkpoint(components, single_file, builtin_name=name, dtype=torch.float16 if half else torch.float32)
        written.append(single_file)
    return written

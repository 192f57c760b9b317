"""Load a base model for training and sampling: builtin, diffusers folder or single file. Offline only."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.common.builtin import BUILTIN_MODELS, build_builtin_components, parse_builtin_name
from stages.common.families import Family, TextEncoderSlot, get_family
from stages.common.errors import InputError, MissingInput

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class ModelBundle:
    """The frozen parts of a Stable Diffusion model that tiflow uses."""

    family: Family
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    identity: str  # names this exact model (weights included) for caches and embedding files
    display_name: str
    tokenizer_2: object = None  # SDXL's second (OpenCLIP bigG) tokenizer and text encoder
    text_encoder_2: torch.nn.Module | None = None

    def encoder_slots(self) -> list[tuple[TextEncoderSlot, object, torch.nn.Module]]:
        """(family slot, tokenizer, text encoder) for each text encoder, in the order the UNet's context joins them."""
        return [(slot, getattr(self, slot.component.replace("text_encoder", "tokenizer")), getattr(self, slot.component))
                for slot in self.family.text_encoders]

    @property
    def text_widths(self) -> tuple[int, ...]:
        return tuple(encoder.get_input_embeddings().weight.shape[1] for _, _, encoder in self.encoder_slots())

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae] + [encoder for _, _, encoder in self.encoder_slots()]


def _freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def fingerprint_file(path: Path, sample: int = 1 << 20) -> str:
    """A fast content fingerprint: size plus three 1 MiB samples (hashing 4 GB checkpoints whole is slow)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for offset in (0, max(0, size // 2 - sample // 2), max(0, size - sample)):
            handle.seek(offset)
            digest.update(handle.read(sample))
    return digest.hexdigest()[:16]


def _detect_folder_family(folder: Path) -> str:
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").exists() else {}
    if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    prediction = json.loads(scheduler_file.read_text()).get("prediction_type", "epsilon") if scheduler_file.exists() else "epsilon"
    if text_config.get("model_type") == "clip_text_model" and text_config.get("hidden_act") == "gelu":
        return "sd2-v" if prediction == "v_prediction" else "sd2"  # OpenCLIP ViT-H uses plain gelu
    return "sd1"


def _load_diffusers_folder(folder: Path, family: str) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from stages.common.builtin import text_encoder_class

    encoders = [slot.component for slot in get_family(family).text_encoders]
    needed = ["unet", "vae"] + [sub for component in encoders for sub in (component, component.replace("text_encoder", "tokenizer"))]
    missing = [sub for sub in needed if not (folder / sub).is_dir()]
    if missing:
        raise InputError(f"model.path: {folder} is not a diffusers {family} model folder: missing {', '.join(missing)}/")
    components = {
        "unet": UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
        "vae": AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True),
        "scheduler": DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
    }
    for component in encoders:
        tokenizer = component.replace("text_encoder", "tokenizer")
        components[tokenizer] = CLIPTokenizer.from_pretrained(folder / tokenizer, local_files_only=True)
        components[component] = text_encoder_class(component).from_pretrained(folder / component, local_files_only=True)
    return components


def model_identity(path: str) -> str:
    """A short string that changes whenever the model's weights change (cache keys, embedding metadata)."""
    builtin = parse_builtin_name(path)
    if builtin:
        return f"builtin-{builtin}"
    target = Path(path)
    if target.is_dir():
        parts = sorted(p for p in target.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
        digest = hashlib.sha256("".join(fingerprint_file(p) for p in parts).encode()).hexdigest()[:16]
        return f"{target.name}-{digest}"
    return f"{target.stem}-{fingerprint_file(target)}"


def load_model(path: str, family: str = "auto") -> ModelBundle:
    """Load every frozen component of the model at `path` (builtin:<name>, a diffusers folder or a file)."""
    builtin = parse_builtin_name(path)
    if builtin:
        components = build_builtin_components(builtin)
        detected = BUILTIN_MODELS[builtin].family
    else:
        target = Path(path)
        if not target.exists():
            raise MissingInput(f"model.path: {target} does not exist; give a diffusers folder, a .safetensors/.ckpt file or builtin:tiny-sd15")
        if target.is_dir():
            detected = _detect_folder_family(target)
            components = _load_diffusers_folder(target, detected)
        elif target.suffix.lower() in SINGLE_FILE_SUFFIXES:
            from stages.common.checkpoint_layout import load_original_checkpoint

            components = load_original_checkpoint(target, family)
            detected = components.pop("family")
        else:
            raise InputError(f"model.path: {target} is neither a folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    chosen = detected if family == "auto" else family
    if family != "auto" and get_family(family).text_encoders[0].embedding_key != get_family(detected).text_encoders[0].embedding_key:
        log.warning("model.family=%s overrides the detected family %s", family, detected)
    family_row = get_family(chosen)
    if family_row.prediction_type != components["scheduler"].config.prediction_type:
        components["scheduler"].register_to_config(prediction_type=family_row.prediction_type)
    _freeze(*(module for name, module in components.items() if name.startswith(("text_encoder", "unet", "vae"))))
    return ModelBundle(
        family=family_row,
        identity=model_identity(path),
        display_name=builtin or Path(path).stem,
        **components,
    )

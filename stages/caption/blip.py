"""The blip method: one sentence per image from a BLIP captioning model in a local folder, through transformers.

As kohya's finetune/make_captions.py: the image resized to the model's square (384 px for
Salesforce/blip-image-captioning-base and -large) and normalised as the folder's
preprocessor_config.json says, then beam search between min_length and max_length tokens.
tiflow never samples, so a rerun writes the same sentences; they are cached by image content,
model files and these settings, so re-captioning after another edit costs no model run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image, UnidentifiedImageError

from stages.caption.device import pick_device
from stages.caption.score_cache import MethodRun, TextCache, run_with_cache
from stages.caption.settings import BlipSettings
from stages.common.errors import InputError
from stages.common.files import hash_bytes, hash_file

_KEY = "caption.blip.model"
_SPACES = re.compile(r"\s+")


class BlipCaptioner:
    """A BLIP captioning model with its processor (image processor and BERT tokenizer), ready to caption batches."""

    def __init__(self, folder: Path, settings: BlipSettings, device: torch.device):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{_KEY}: transformers cannot load a BLIP captioning model from {folder} ({first}); give a folder "
                             "saved by BlipForConditionalGeneration and BlipProcessor (e.g. a local copy of "
                             "Salesforce/blip-image-captioning-base)") from None
        self.model.requires_grad_(False).eval().to(device)
        self.device, self.settings = device, settings

    @torch.inference_mode()
    def caption(self, paths: list[Path]) -> list[str]:
        images = [_read_rgb(path) for path in paths]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, torch.float32)
        ids = self.model.generate(pixel_values=pixels, num_beams=self.settings.num_beams, do_sample=False,
                                  min_length=self.settings.min_length, max_length=self.settings.max_length)
        return [one_line(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


def one_line(text: str) -> str:
    """A generated sentence as one caption line: whitespace runs (newlines included) become single spaces."""
    return _SPACES.sub(" ", text).strip()


def _read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"caption.blip: cannot read {path} ({exc}); rerun preprocess to rewrite it, or remove it from the dataset") from None


def blip_cache_key(files: list[Path], settings: BlipSettings) -> str:
    """The model's files (names and contents) and the generation settings: what a cached sentence depends on.

    Weights in formats transformers does not read here (TensorFlow, Flax, and .bin beside
    .safetensors, as the Hub's folders hold them side by side) are not hashed.
    """
    unread = (".h5", ".msgpack") + ((".bin",) if any(path.suffix == ".safetensors" for path in files) else ())
    parts = {path.name: hash_file(path) for path in files if not path.name.endswith(unread) and path.suffix != ".md"}
    parts["generate"] = {"num_beams": settings.num_beams, "min_length": settings.min_length, "max_length": settings.max_length}
    return hash_bytes(json.dumps(parts, sort_keys=True).encode("utf-8"))


def caption_with_blip(
    images: dict[str, Path],
    settings: BlipSettings,
    store: Path,
    progress: Callable[[list, str], Iterable] = lambda batches, method: batches,
) -> MethodRun:
    """One sentence for each image (name → path), from the cache or the model (loaded only if some image needs it)."""
    files = settings.require_files()
    cache = TextCache(store / "blip", blip_cache_key(files, settings))

    def open_model() -> tuple[Callable[[list[Path]], list[str]], int]:
        return BlipCaptioner(settings.model, settings, pick_device(settings.device, "caption.blip.device")).caption, settings.batch_size

    return run_with_cache("blip", images, cache, open_model, progress)

"""Training examples: cached latent distributions paired with their captions, and their order."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file


@dataclass
class LatentExample:
    image: str
    mean: torch.Tensor  # [4, h, w], unscaled VAE output
    logvar: torch.Tensor
    caption: str
    image_sha256: str = ""  # content hash of the preprocessed image: what the validation split is drawn by


def load_examples(latents_dir: Path, captions_dir: Path) -> list[LatentExample]:
    """Every cache entry listed in latents/manifest.csv with the caption of its image."""
    manifest = pd.read_csv(latents_dir / "manifest.csv", keep_default_na=False)
    captions = pd.read_csv(captions_dir / "captions.csv", keep_default_na=False)
    caption_of = dict(zip(captions.image, captions.caption))
    examples = []
    for record in manifest.itertuples():
        if record.image not in caption_of:
            raise ValueError(f"{captions_dir / 'captions.csv'} has no caption for {record.image}; rerun the caption stage")
        latent_path = latents_dir / record.latent_file
        if not latent_path.is_file():
            raise FileNotFoundError(f"{latent_path} (listed in {latents_dir / 'manifest.csv'}) is missing; rerun cache_latents")
        tensors = load_file(str(latent_path))
        examples.append(LatentExample(record.image, tensors["mean"], tensors["logvar"], str(caption_of[record.image]),
                                      str(getattr(record, "image_sha256", ""))))
    if not examples:
        raise ValueError(f"{latents_dir / 'manifest.csv'} lists no latents; nothing to train on")
    return examples


def split_validation(examples: list[LatentExample], fraction: float) -> tuple[list[LatentExample], list[LatentExample]]:
    """(training, held out): `fraction` of the images, never trained on, for evaluate's validation loss.

    The held-out images are those whose content hashes rank lowest, so the choice does not depend
    on file order, and adding images moves few of them. An image and its mirrored copy stay
    together. With fraction > 0, at least one image is held out and at least one is trained on.
    """
    if fraction <= 0:
        return list(examples), []
    images = sorted({e.image: e.image_sha256 or hashlib.sha256(e.image.encode()).hexdigest() for e in examples}.items(),
                    key=lambda item: (item[1], item[0]))
    if len(images) < 2:
        raise ValueError(f"train.validation_split: {fraction} needs at least 2 images, but the dataset has {len(images)}; "
                         "set validation_split: 0 or add images")
    count = min(len(images) - 1, max(1, round(fraction * len(images))))
    held_out = {name for name, _ in images[:count]}
    return [e for e in examples if e.image not in held_out], [e for e in examples if e.image in held_out]


def sample_latent(example: LatentExample, method: str, generator: torch.Generator, fixed: torch.Tensor | None = None) -> torch.Tensor:
    """AUTOMATIC1111's latent sampling: `deterministic` = mean, `random` = fresh sample, `once` = `fixed`."""
    if method == "deterministic":
        return example.mean
    if method == "once" and fixed is not None:
        return fixed
    eps = torch.randn(example.mean.shape, generator=generator)  # eps ~ N(0, I)
    return example.mean + torch.exp(0.5 * example.logvar) * eps  # z = mu + sigma * eps


class ExampleOrder:
    """Shuffled passes over the examples, each image `repeats` times per pass; resumable mid-pass."""

    def __init__(self, count: int, repeats: int, seed: int):
        self.count, self.repeats = count, repeats
        self.rng = random.Random(seed)
        self.pending: list[int] = []

    def take(self, n: int) -> list[int]:
        taken = []
        for _ in range(n):
            if not self.pending:
                self.pending = [i for i in range(self.count) for _ in range(self.repeats)]
                self.rng.shuffle(self.pending)
            taken.append(self.pending.pop())
        return taken

    def state_dict(self) -> dict:
        return {"pending": list(self.pending), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pending = list(state["pending"])

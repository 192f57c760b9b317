"""Latent examples: each cached latent distribution with its image's caption, as training and evaluate read them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from stages.common.errors import InputError, MissingInput


class LatentExample:
    """One training latent: its image, caption and VAE distribution (unscaled mean and logvar, [4, h, w]).

    Built from a cache file, it reads the tensors from that file on each use instead of holding
    them, so a 10,000-image dataset costs the trainer no more memory than ten (the page cache
    keeps the reads cheap). Built from tensors, it holds them.
    """

    def __init__(self, image: str, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None, caption: str = "",
                 image_sha256: str = "", latent_file: Path | None = None, latent_size: tuple[int, int] | None = None,
                 size_condition: tuple[int, int, int, int, int, int] | None = None):
        if (mean is None or logvar is None) and latent_file is None:
            raise InputError(f"{image}: a latent example needs mean and logvar, or the cache file that holds them")
        self.image, self.caption, self.image_sha256, self.latent_file = image, caption, image_sha256, latent_file
        self._mean, self._logvar = mean, logvar
        self._latent_size = latent_size
        # SDXL's add_time_ids: (original_height, original_width, crop_top, crop_left, target_height, target_width); None when unknown
        self.size_condition = size_condition

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latent: examples of one size can share a batch."""
        if self._latent_size is None:
            if self._mean is not None:
                self._latent_size = tuple(self._mean.shape[-2:])
            else:
                with safe_open(str(self.latent_file), framework="pt") as entry:
                    self._latent_size = tuple(entry.get_slice("mean").get_shape()[-2:])
        return self._latent_size

    @property
    def mean(self) -> torch.Tensor:
        return self._mean if self._mean is not None else self._read("mean")[0]

    @property
    def logvar(self) -> torch.Tensor:
        return self._logvar if self._logvar is not None else self._read("logvar")[0]

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), from one read of the cache file."""
        if self._mean is not None and self._logvar is not None:
            return self._mean, self._logvar
        mean, logvar = self._read("mean", "logvar")
        return mean, logvar

    def _read(self, *names: str) -> list[torch.Tensor]:
        try:
            with safe_open(str(self.latent_file), framework="pt") as entry:
                return [entry.get_tensor(name) for name in names]
        except (OSError, SafetensorError) as error:
            raise MissingInput(f"{self.latent_file} (the latents of {self.image}) can no longer be read ({error}); "
                                    "rerun cache_latents, and don't prune its store while training runs") from None

    def __repr__(self) -> str:
        return f"LatentExample({self.image!r}, caption={self.caption!r}, latent_file={self.latent_file})"


def load_examples(latents_dir: Path, captions_dir: Path) -> list[LatentExample]:
    """Every cache entry listed in latents/manifest.csv with the caption of its image."""
    manifest = pd.read_csv(latents_dir / "manifest.csv", keep_default_na=False)
    captions = pd.read_csv(captions_dir / "captions.csv", keep_default_na=False)
    caption_of = dict(zip(captions.image, captions.caption))
    examples = []
    for record in manifest.itertuples():
        if record.image not in caption_of:
            raise InputError(f"{captions_dir / 'captions.csv'} has no caption for {record.image}; rerun the caption stage")
        latent_path = latents_dir / record.latent_file
        if not latent_path.is_file():
            raise MissingInput(f"{latent_path} (listed in {latents_dir / 'manifest.csv'}) is missing; rerun cache_latents")
        size = (int(record.latent_height), int(record.latent_width)) if hasattr(record, "latent_height") else None
        examples.append(LatentExample(record.image, caption=str(caption_of[record.image]),
                                      image_sha256=str(getattr(record, "image_sha256", "")), latent_file=latent_path, latent_size=size,
                                      size_condition=_size_condition(record, latents_dir / "manifest.csv")))
    if not examples:
        raise InputError(f"{latents_dir / 'manifest.csv'} lists no latents; nothing to train on")
    return examples


_CONDITION_COLUMNS = ("original_height", "original_width", "crop_top", "crop_left", "height", "width")


def _size_condition(record, manifest_path: Path) -> tuple[int, int, int, int, int, int] | None:
    """SDXL's add_time_ids from the row; None when a manifest from before these columns, or an empty cell, leaves it unknown."""
    cells = [getattr(record, name, "") for name in _CONDITION_COLUMNS]
    if any(cell == "" for cell in cells):
        return None
    try:
        return tuple(int(float(cell)) for cell in cells)
    except ValueError:
        found = ", ".join(f"{name} {cell!r}" for name, cell in zip(_CONDITION_COLUMNS, cells))
        raise InputError(f"{manifest_path}: the row of {record.image} has a size that is not a whole number ({found}); rerun cache_latents") from None


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
        raise InputError(f"train.validation_split: {fraction} needs at least 2 images, but the dataset has {len(images)}; "
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
    mean, logvar = example.distribution()  # one read for a file-backed example
    eps = torch.randn(mean.shape, generator=generator)  # eps ~ N(0, I)
    return mean + torch.exp(0.5 * logvar) * eps  # z = mu + sigma * eps


def once_sample(example: LatentExample, index: int, seed: int) -> torch.Tensor:
    """AUTOMATIC1111's `once`: one sample per image for the whole run, drawn from a seed per image
    instead of being stored, so it is the same at every step and after a resume, at no memory cost."""
    return sample_latent(example, "random", torch.Generator().manual_seed(seed * 1_000_003 + index))

"""VAE-encode preprocessed images into a content-keyed store that survives reruns.

Each entry holds the latent distribution's `mean` and `logvar` (unscaled VAE output), so
training can reproduce AUTOMATIC1111's `once`, `deterministic` and `random` latent sampling.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import save_file

from stages.common.files import atomic_path, hash_file, write_csv_atomic

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image", "flip", "latent_file", "width", "height", "latent_width", "latent_height", "image_sha256"]


@dataclass
class CacheSummary:
    encoded: int
    reused: int


def image_to_tensor(path: Path, flip: bool) -> torch.Tensor:
    """A PNG as a [3, H, W] tensor in [-1, 1], the VAE's input range."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    return tensor.flip(-1) if flip else tensor


@torch.no_grad()
def encode_batch(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the VAE's latent distribution for a batch of images in [-1, 1]."""
    distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
    mean, logvar = distribution.mean.float(), distribution.logvar.float()
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        raise FloatingPointError("the VAE produced NaN/inf latents")
    return mean, logvar


def cache_key(image_sha256: str, vae_identity: str, width: int, height: int, flip: bool) -> str:
    return f"{vae_identity}/{image_sha256[:32]}-{width}x{height}{'-flip' if flip else ''}"


def cache_latents(
    preprocess_dir: Path,
    out_dir: Path,
    store_dir: Path,
    vae: torch.nn.Module,
    vae_identity: str,
    flip: bool = False,
    batch_size: int = 4,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> CacheSummary:
    """Encode what the store lacks and write out_dir/manifest.csv pointing at every entry training reads."""
    manifest = pd.read_csv(preprocess_dir / "manifest.csv", keep_default_na=False)
    jobs = []
    for record in manifest.itertuples():
        image_path = preprocess_dir / record.output
        digest = hash_file(image_path)
        for flipped in ([False, True] if flip else [False]):
            key = cache_key(digest, vae_identity, record.out_width, record.out_height, flipped)
            jobs.append((record.output, image_path, flipped, digest, key, record.out_width, record.out_height))
    missing = [job for job in jobs if not (store_dir / f"{job[4]}.safetensors").exists()]
    # same-sized images batch together (buckets give several sizes)
    missing.sort(key=lambda job: (job[5], job[6]))
    batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
    for batch in progress(batches):
        for size_group in _group_by_size(batch):
            pixels = torch.stack([image_to_tensor(job[1], job[2]) for job in size_group])
            mean, logvar = encode_batch(vae, pixels)
            for job, m, lv in zip(size_group, mean, logvar):
                target = store_dir / f"{job[4]}.safetensors"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as temp:
                    save_file({"mean": m.contiguous(), "logvar": lv.contiguous()}, str(temp))
    rows = []
    for output, _, flipped, digest, key, width, height in jobs:
        latent_file = os.path.relpath(store_dir / f"{key}.safetensors", out_dir)
        rows.append({"image": output, "flip": flipped, "latent_file": latent_file, "width": width, "height": height,
                     "latent_width": width // 8, "latent_height": height // 8, "image_sha256": digest})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out_dir / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    return CacheSummary(encoded=len(missing), reused=len(jobs) - len(missing))


def _group_by_size(batch: list) -> list[list]:
    groups: dict[tuple[int, int], list] = {}
    for job in batch:
        groups.setdefault((job[5], job[6]), []).append(job)
    return list(groups.values())

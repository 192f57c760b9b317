"""The latent store: one safetensors file per (image, VAE, size, dtype, tiling, flip), kept across reruns.

It lives outside Snakemake's declared outputs, so a rerun reuses every entry whose key still
matches. Entries are written atomically, so an interrupted run leaves whole entries or none.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stages.common.files import atomic_path, prune_tree

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class EntryKey:
    """Everything that changes an entry's latents; a change gives another file name."""

    image_sha256: str
    vae_identity: str
    width: int
    height: int
    flip: bool
    dtype: str  # the compute dtype asked for: fp32 | fp16 | bf16 (an fp32 retry is stored under it)
    tiled: bool = False

    @property
    def relative_path(self) -> str:
        tiled = "-tiled" if self.tiled else ""
        flip = "-flip" if self.flip else ""
        return f"{self.vae_identity}/{self.image_sha256[:32]}-{self.width}x{self.height}-{self.dtype}{tiled}{flip}{SUFFIX}"

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


class LatentStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: EntryKey) -> Path:
        return self.root / key.relative_path

    def holds(self, key: EntryKey) -> bool:
        """True when the entry exists and its header has `mean` and `logvar` of the key's latent size."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as entry:
                shapes = [entry.get_slice(name).get_shape() for name in ("mean", "logvar")]
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("%s is not a readable latent entry (%s); encoding it again", path, exc)
            return False
        if any(tuple(shape[-2:]) != key.latent_size for shape in shapes):
            log.warning("%s holds latents of shape %s, not %s; encoding it again", path, shapes[0], key.latent_size)
            return False
        return True

    def write(self, key: EntryKey, mean: torch.Tensor, logvar: torch.Tensor, encoded_dtype: str) -> Path:
        """Store one sample's float32 mean and logvar, with its key as readable metadata."""
        target = self.path(key)
        metadata = {
            "format": FORMAT_VERSION, "image_sha256": key.image_sha256, "vae": key.vae_identity,
            "width": str(key.width), "height": str(key.height), "flip": str(key.flip),
            "dtype": key.dtype, "encoded_dtype": encoded_dtype, "tiled": str(key.tiled),
        }
        tensors = {"mean": mean.float().contiguous(), "logvar": logvar.float().contiguous()}
        with atomic_path(target) as temp:
            save_file(tensors, str(temp), metadata=metadata)
        return target

    def prune(self, keep: set[Path]) -> tuple[int, int]:
        """Delete every entry (any VAE) not in `keep`, and leftovers of killed writes: (files, bytes) freed."""
        keep = {p.resolve() for p in keep}

        def in_use(path: Path) -> bool:
            if path.name.endswith(".partial"):
                return False
            return not path.name.endswith(SUFFIX) or path.resolve() in keep  # vae.json and other notes stay

        return prune_tree(self.root, in_use)

"""Run the VAE encoder in a chosen dtype, with an fp32 retry for samples that overflow.

fp16 VAEs (notably SDXL's) can overflow to NaN/inf on some images. Those samples are encoded
again with an fp32 copy of the VAE; a sample that is still non-finite is reported as failed
and the caller never caches it.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, field

import torch
from stages.common.errors import InputError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class EncoderMemoryError(InputError):
    """The device ran out of memory for one batch: a setting to change, not a crash."""


@dataclass
class EncodedBatch:
    mean: torch.Tensor  # [N, C, h, w] float32 on the CPU, unscaled
    logvar: torch.Tensor
    retried: list[int] = field(default_factory=list)  # samples re-encoded in fp32 after a non-finite result
    failed: list[int] = field(default_factory=list)  # samples non-finite even in fp32: never to be cached


def finite_samples(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """[N] bool: True where a sample's mean and logvar are all finite."""
    return torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(logvar).flatten(1).all(1)


@torch.no_grad()  # not inference_mode: the fp32 retry writes into these tensors
def encode_batch(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of the VAE's latent distribution for images in [-1, 1], as float32 on the CPU."""
    weight = next(vae.parameters())
    pixels = pixels.to(weight.device, weight.dtype, memory_format=torch.channels_last, non_blocking=True)
    distribution = vae.encode(pixels).latent_dist
    return distribution.mean.float().cpu().contiguous(), distribution.logvar.float().cpu().contiguous()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """16 hex digits that change with any weight, so checkpoints that share a VAE share its cache."""
    digest = hashlib.sha256(type(vae).__name__.encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # raw bytes, any dtype
    return digest.hexdigest()[:16]


def _place(vae: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `vae` on `device` in `dtype`, channels-last; the original is left as it was (fp32, for retries)."""
    # channels-last convolutions: 10-25% faster on the CPU (BENCHMARKS.md), the usual layout for GPU convolutions.
    # nn.Module.to, not diffusers' override, which warns about fp32 modules even when there are none
    return torch.nn.Module.to(copy.deepcopy(vae), device=device, dtype=dtype, memory_format=torch.channels_last)


class LatentEncoder:
    """The model's VAE on `device` in `dtype` (fp32|fp16|bf16), with tiling/slicing as asked.

    It runs a copy; the VAE passed in is not changed.
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device, dtype: str, tiling: bool = False, slicing: bool = False):
        self.source, self.device, self.dtype = vae, device, dtype
        self.tiling, self.slicing = tiling, slicing
        if tiling and not hasattr(vae, "enable_tiling"):
            raise InputError(f"cache_latents.tiling: {type(vae).__name__} has no tiled encoding; set tiling: false")
        if slicing and not hasattr(vae, "enable_slicing"):
            raise InputError(f"cache_latents.slicing: {type(vae).__name__} has no sliced encoding; set slicing: false")
        self.fast = self._prepared(DTYPES[dtype])
        self._fp32: torch.nn.Module | None = self.fast if dtype == "fp32" else None

    def _prepared(self, dtype: torch.dtype) -> torch.nn.Module:
        vae = _place(self.source, self.device, dtype)
        if self.tiling:
            vae.enable_tiling()
        if self.slicing:
            vae.enable_slicing()
        return vae

    def tiles(self, width: int, height: int) -> bool:
        """Whether an image of this size is encoded in tiles (its latents then differ slightly at the seams)."""
        limit = getattr(self.source, "tile_sample_min_size", None)
        return self.tiling and limit is not None and max(width, height) > limit

    def encode(self, pixels: torch.Tensor) -> EncodedBatch:
        """Encode [N, 3, H, W] pixels in [-1, 1]; non-finite samples are retried in fp32, then marked failed."""
        mean, logvar = self._run(self.fast, pixels)
        bad = (~finite_samples(mean, logvar)).nonzero().flatten().tolist()
        if not bad:
            return EncodedBatch(mean, logvar)
        if self.dtype == "fp32":
            return EncodedBatch(mean, logvar, failed=bad)
        log.warning("the VAE overflowed in %s on %d of %d images; encoding them again in fp32", self.dtype, len(bad), len(pixels))
        if self._fp32 is None:
            self._fp32 = self._prepared(torch.float32)
        retry_mean, retry_logvar = self._run(self._fp32, pixels[bad])
        mean[bad], logvar[bad] = retry_mean, retry_logvar
        still_bad = [bad[i] for i in (~finite_samples(retry_mean, retry_logvar)).nonzero().flatten().tolist()]
        return EncodedBatch(mean, logvar, retried=[i for i in bad if i not in still_bad], failed=still_bad)

    def _run(self, vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return encode_batch(vae, pixels)
        except torch.OutOfMemoryError:
            raise EncoderMemoryError(
                f"out of {self.device} memory encoding {len(pixels)} images of {pixels.shape[-1]}x{pixels.shape[-2]}: "
                "lower cache_latents.batch_size, or set cache_latents.slicing (and tiling for large images) to true"
            ) from None

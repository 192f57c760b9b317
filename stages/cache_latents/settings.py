"""The cache_latents section of config.yaml as a record, and the device/dtype it resolves to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.common.config import ConfigError, section_record_values, validate_config

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class CacheSettings:
    batch_size: int  # images per VAE call (0 = 1 on the CPU, where that is fastest; 4 on a GPU); one size per call
    dtype: str  # auto = fp16 on a GPU (fp32 retry where it overflows), fp32 on the CPU
    device: str  # auto = cuda when torch sees a GPU
    tiling: bool  # diffusers enable_tiling: images larger than the VAE's tile in overlapping tiles
    slicing: bool  # diffusers enable_slicing: one image at a time inside a batch, same latents
    prune: bool  # delete store entries the new manifest does not use

    @classmethod
    def from_section(cls, section: dict) -> "CacheSettings":
        """From the schema-checked cache_latents section (the schema holds the defaults and allowed values)."""
        return cls(**section_record_values(cls, section, "cache_latents", "cache_latents"))

    @classmethod
    def from_schema(cls, **values) -> "CacheSettings":
        """As if config.yaml said `cache_latents: values`; the schema fills the rest (tests, benchmarks)."""
        return cls.from_section(validate_config({"cache_latents": values}, source="settings")["cache_latents"])

    def resolve_device(self) -> torch.device:
        import torch  # here, so that the command line's --help and config errors need no torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("cache_latents.device: cuda, but this torch sees no GPU (a CPU build of torch?); use auto or cpu")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> str:
        """The compute dtype's name (fp32 | fp16 | bf16); part of every cache key."""
        if self.dtype == "auto":
            return "fp16" if device.type == "cuda" else "fp32"
        return self.dtype

    def resolve_batch_size(self, device: torch.device) -> int:
        if self.batch_size:
            return self.batch_size
        return 4 if device.type == "cuda" else 1  # on 2 CPU cores one image at a time ran 30% faster than 4

"""The preprocess section of config.yaml as one checked record, and the hash that keys the image cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from PIL import ImageColor
from stages.common.errors import InputError

MODES = ("center", "pad", "focal", "bucket", "none")
SPLIT_MODES = ("center", "pad", "focal")  # bucket and none keep each image's own aspect ratio
# Bump when a code change alters the images written for unchanged settings, so old cache entries are not reused.
PROCESSING_VERSION = 2
# Settings that never change one image's framed pixels: leaving them out of the cache key means
# toggling them reuses every cached image.
_NOT_IN_CACHE_KEY = ("flip", "recursive", "caption_extension", "near_duplicate_distance", "prune")


def parse_colour(value: str, key: str) -> tuple[int, int, int]:
    """'white', '#ff8800' or 'rgb(255,136,0)' as an RGB triple; an error names the config key."""
    try:
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise InputError(f"preprocess.{key}: {value!r} is not a colour; use a name such as white or a hex code such as #808080") from None


@dataclass(frozen=True)
class PreprocessSettings:
    size: tuple[int, int]  # (width, height) of every framed image; bucket mode: the target area
    mode: str = "center"
    flip: bool = False  # recorded in the manifest; cache_latents encodes the mirrored copies
    recursive: bool = False
    caption_extension: str = ".txt"
    background: tuple[int, int, int] = (255, 255, 255)  # behind transparent pixels
    fill: tuple[int, int, int] | str = (255, 255, 255)  # pad mode's borders, or "edge" to stretch the outer pixels
    min_side: int = 64  # smaller sources carry too little detail to train on
    max_upscale: float = 4.0
    max_pixels: int = 100_000_000  # decompression-bomb guard
    split: bool = False
    split_threshold: float = 0.5
    split_overlap: float = 0.2
    focal_face_weight: float = 0.9  # AUTOMATIC1111's defaults
    focal_entropy_weight: float = 0.15
    focal_edges_weight: float = 0.5
    focal_debug: bool = False
    bucket_min_side: int = 256  # kohya's min_bucket_reso, max_bucket_reso, bucket_reso_steps
    bucket_max_side: int = 1024
    bucket_step: int = 64
    near_duplicate_distance: int = 4  # bits of 64 that may differ in the difference hash
    prune: bool = False  # delete cache entries of other settings and of images no longer in the folder

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"preprocess.mode: {self.mode!r} is not a mode; choose one of {', '.join(MODES)}")
        if self.split and self.mode not in SPLIT_MODES:
            raise InputError(f"preprocess.split: splitting needs mode {', '.join(SPLIT_MODES)}; mode {self.mode} keeps each image's aspect ratio")
        if not 0 <= self.split_overlap < 1:
            raise InputError(f"preprocess.split_overlap: {self.split_overlap} must be at least 0 and below 1")
        if self.mode == "bucket":
            self._check_buckets()

    def _check_buckets(self) -> None:
        if self.bucket_min_side > self.bucket_max_side:
            raise InputError(f"preprocess.bucket_min_side ({self.bucket_min_side}) is larger than preprocess.bucket_max_side ({self.bucket_max_side})")
        square = int(math.sqrt(self.size[0] * self.size[1]) // self.bucket_step) * self.bucket_step
        if not self.bucket_min_side <= square <= self.bucket_max_side:
            raise InputError(
                f"preprocess.size: the square bucket of this area is {square}x{square}, outside "
                f"preprocess.bucket_min_side..bucket_max_side ({self.bucket_min_side}..{self.bucket_max_side}); change the size or those bounds"
            )

    @classmethod
    def from_section(cls, section: dict) -> "PreprocessSettings":
        """Settings from the validated `preprocess:` section (schema defaults already filled)."""
        size = section["size"]
        values = dict(section)
        values["size"] = (size, size) if isinstance(size, int) else tuple(size)
        if "background" in values:
            values["background"] = parse_colour(values["background"], "background")
        if "fill" in values:
            values["fill"] = "edge" if values["fill"] == "edge" else parse_colour(values["fill"], "fill")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"preprocess: unknown keys {', '.join(unknown)}; allowed keys: {', '.join(sorted(known))}")
        return cls(**values)

    def cache_key(self) -> str:
        """A hash of everything that shapes one image's outputs: equal key + equal file content → equal outputs."""
        shaping = {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IN_CACHE_KEY and self._shapes_output(k)}
        shaping["version"] = PROCESSING_VERSION
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]

    def _shapes_output(self, key: str) -> bool:
        """Whether `key` matters in this mode (focal weights do nothing in center mode, and so on)."""
        if key.startswith("focal_"):
            return self.mode == "focal"
        if key.startswith("bucket_"):
            return self.mode == "bucket"
        if key.startswith("split_"):
            return self.split
        if key == "fill":
            return self.mode == "pad"
        return True

"""The preprocess section of config.yaml as one checked record, and the hash that keys the image cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from PIL import ImageColor
from stages.common.config import section_record_values, validate_config
from stages.common.errors import InputError
from stages.common.layout import frame_size

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
    mode: str
    flip: bool  # recorded in the manifest; cache_latents encodes the mirrored copies
    recursive: bool
    caption_extension: str
    background: tuple[int, int, int]  # behind transparent pixels
    fill: tuple[int, int, int] | str  # pad mode's borders, or "edge" to stretch the outer pixels
    min_side: int  # smaller sources carry too little detail to train on
    max_upscale: float
    max_pixels: int  # decompression-bomb guard
    split: bool
    split_threshold: float
    split_overlap: float
    focal_face_weight: float
    focal_entropy_weight: float
    focal_edges_weight: float
    focal_debug: bool
    bucket_min_side: int  # kohya's min_bucket_reso, max_bucket_reso, bucket_reso_steps
    bucket_max_side: int
    bucket_step: int
    near_duplicate_distance: int  # bits of 64 that may differ in the difference hash
    prune: bool  # delete cache entries of other settings and of images no longer in the folder

    def __post_init__(self) -> None:
        if self.split and self.mode not in SPLIT_MODES:
            raise InputError(f"preprocess.split: splitting needs mode {', '.join(SPLIT_MODES)}; mode {self.mode} keeps each image's aspect ratio")
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
        """From the schema-checked `preprocess:` section (the schema holds the defaults and allowed values)."""
        values = section_record_values(cls, dict(section), "preprocess", "preprocess")
        values["size"] = frame_size(values["size"])
        values["background"] = parse_colour(values["background"], "background")
        values["fill"] = "edge" if values["fill"] == "edge" else parse_colour(values["fill"], "fill")
        return cls(**values)

    @classmethod
    def from_schema(cls, **values) -> "PreprocessSettings":
        """As if config.yaml said `preprocess: values` (a size may be a (width, height) tuple); the schema fills the rest."""
        if isinstance(values.get("size"), tuple):
            values["size"] = list(values["size"])
        return cls.from_section(validate_config({"preprocess": values}, source="settings")["preprocess"])

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

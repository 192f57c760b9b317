"""Opening any image a user may have as upright 8-bit sRGB, or a SkipImage saying why not."""
from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from stages.preprocess.sources import UNSUPPORTED_IMAGE_SUFFIXES, SkipImage

log = logging.getLogger(__name__)

_SRGB = ImageCms.createProfile("sRGB")


@dataclass
class SourceImage:
    """An opened source: `image` is RGB and upright, possibly decoded at a reduced size (JPEG draft)."""

    image: Image.Image
    width: int  # the full upright size of the file, before any reduced decoding
    height: int
    animated: bool = False  # only the first frame is used

    @property
    def scale(self) -> tuple[float, float]:
        """Pixels of `image` per source pixel, per axis (1.0 unless decoded reduced)."""
        return self.image.width / self.width, self.image.height / self.height


def _upright_size(opened: Image.Image) -> tuple[int, int]:
    orientation = opened.getexif().get(0x0112, 1)
    return (opened.height, opened.width) if orientation in (5, 6, 7, 8) else opened.size


def load_source(
    path: Path,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = 100_000_000,
    scale_for: Callable[[int, int], float | None] | None = None,
) -> SourceImage:
    """Open `path` as upright RGB, or raise SkipImage with the reason.

    `scale_for(width, height)` tells how much the caller will shrink the picture; a JPEG is then
    decoded at the smallest 1/2, 1/4 or 1/8 size that still has enough pixels, which is several
    times faster on photos and loses nothing the resize would keep.
    """
    if path.stat().st_size == 0:
        raise SkipImage("empty file (0 bytes)")
    if path.suffix.lower() in UNSUPPORTED_IMAGE_SUFFIXES:
        raise SkipImage(f"{UNSUPPORTED_IMAGE_SUFFIXES[path.suffix.lower()]} images are not supported; convert it to PNG or JPEG")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow then warns past our limit, and we refuse on that warning
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = _upright_size(opened)
                animated = getattr(opened, "is_animated", False)  # not n_frames: that walks every frame
                needed = scale_for(width, height) if scale_for is not None else None
                if needed is not None and needed < 0.5 and opened.format == "JPEG":
                    opened.draft("RGB", (math.ceil(opened.width * needed), math.ceil(opened.height * needed)))
                opened.seek(0)  # animated files: the first frame
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SkipImage(f"decompression bomb refused: more than {max_pixels:,} pixels; raise preprocess.max_pixels if the image is genuine") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image Pillow can read") from None
    except PermissionError as exc:
        raise SkipImage(f"unreadable: {exc.strerror or exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncated" in str(exc) or isinstance(exc, EOFError):
            raise SkipImage(f"truncated image: the file ends early ({exc}); copy it again from its source") from None
        raise SkipImage(f"corrupt image: {exc}") from None
    except Exception as exc:  # malformed files make Pillow's decoders fail in many ways; one bad file must not stop the run
        raise SkipImage(f"corrupt image (the decoder failed: {type(exc).__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return SourceImage(to_rgb(image, background), width, height, animated)


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255), max_pixels: int = 100_000_000) -> Image.Image:
    """The whole image at full size as 8-bit RGB, upright, alpha composited on `background`."""
    return load_source(path, background, max_pixels).image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """8-bit sRGB: deep greys scaled (not clipped), colour profiles applied, transparency on `background`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _deep_grey_to_8bit(image)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    image = _to_srgb(image)
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _deep_grey_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1.0 else (255.0 if values.max(initial=0) <= 255 else 65535.0)
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (Adobe RGB, Display P3, CMYK press profiles) so colours look as intended."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower():
            return image
        return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGBA" if image.mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.debug("colour profile ignored (%s); using the pixel values as they are", exc)
        return image

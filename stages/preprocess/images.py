"""Reading user images safely and framing them to the training size."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IGNORED_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}
CAPTION_ENCODINGS = ("utf-8-sig", "shift_jis", "gbk")


class SkipImage(Exception):
    """An input file that cannot be used; its message is the reason written to skipped.csv."""


def list_source_files(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(images, other files) in `folder`, sorted; captions and OS clutter are neither."""
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset.images: {folder} is not a folder of images")
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    images, others = [], []
    for path in entries:
        if not path.is_file() or path.name.lower() in IGNORED_NAMES or path.name.startswith("._"):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.suffix.lower() != ".txt":
            others.append(path)
    return images, others


def load_rgb(path: Path, background: tuple[int, int, int] = (255, 255, 255), max_pixels: int = 100_000_000) -> Image.Image:
    """Open any image a user may have as 8-bit RGB, upright, alpha composited on `background`."""
    if path.stat().st_size == 0:
        raise SkipImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                if opened.width * opened.height > max_pixels:
                    raise SkipImage(f"too many pixels ({opened.width}x{opened.height} > {max_pixels:,}); raise the pixel limit if this is intended")
                opened.seek(0)  # animated files: the first frame
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except SkipImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipImage(f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipImage(f"corrupt or truncated image: {exc}") from None
    return to_rgb(image, background)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")  # 16-bit: keep the top 8 bits
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def frame_center(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale so the image covers `size`, then cut the middle: (framed image, crop box in source pixels)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = width / scale, height / scale
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    box = (round(left), round(top), round(left + crop_w), round(top + crop_h))
    return image.resize(size, Image.Resampling.LANCZOS, box=box), box


def frame_pad(image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Scale to fit inside `size` and letterbox with `fill`: nothing of the picture is cut."""
    fitted = ImageOps.contain(image, size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", size, fill)
    canvas.paste(fitted, ((size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2))
    return canvas, (0, 0, image.width, image.height)


def frame_none(image: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Keep the size, cut to multiples of 8 (the VAE's stride) from the bottom-right."""
    width, height = image.width // 8 * 8, image.height // 8 * 8
    return image.crop((0, 0, width, height)), (0, 0, width, height)


def read_caption(path: Path) -> str | None:
    """A caption sidecar's text in any encoding users' editors write, or None if there is none."""
    if not path.is_file():
        return None
    raw = path.read_bytes()
    for encoding in CAPTION_ENCODINGS:
        try:
            return raw.decode(encoding).strip()
        except UnicodeDecodeError:
            continue
    raise SkipImage(f"caption {path.name} is in an unknown text encoding (tried {', '.join(CAPTION_ENCODINGS)})")

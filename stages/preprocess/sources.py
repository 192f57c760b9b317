"""Finding the files of a user's image folder and the caption sidecars that travel with them."""
from __future__ import annotations

import logging
from pathlib import Path
from stages.common.errors import MissingInput

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".avif"}
# Pictures a user means as training images but Pillow cannot decode: skipped with a reason, never ignored.
UNSUPPORTED_IMAGE_SUFFIXES = {
    ".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL", ".svg": "SVG (vector)", ".psd": "Photoshop",
    ".cr2": "camera raw", ".cr3": "camera raw", ".nef": "camera raw", ".arw": "camera raw", ".dng": "camera raw",
    ".orf": "camera raw", ".rw2": "camera raw", ".raf": "camera raw",
}
# Files operating systems and tools leave in folders; never reported.
IGNORED_NAMES = {"thumbs.db", ".ds_store", "desktop.ini", ".directory", "ehthumbs.db"}
IGNORED_FOLDERS = {"__macosx", "@eadir", ".thumbnails"}
CAPTION_ENCODINGS = ("utf-8-sig", "shift_jis", "gbk")


class SkipImage(Exception):
    """An input file that cannot be used; its message is the reason written to skipped.csv."""


def _is_clutter(path: Path, folder: Path) -> bool:
    relative = path.relative_to(folder)
    hidden_folder = any(part.startswith(".") or part.lower() in IGNORED_FOLDERS for part in relative.parts[:-1])
    return hidden_folder or path.name.lower() in IGNORED_NAMES or path.name.startswith("._")


def list_source_files(folder: Path, recursive: bool = False, caption_extension: str = ".txt") -> list[Path]:
    """Every file of `folder` that may be an image, sorted; captions and OS clutter are left out.

    Files with other extensions are included too: the worker sniffs them, so a picture saved
    without its extension is still used, while notes and documents are ignored quietly there.
    """
    if not folder.is_dir():
        raise MissingInput(f"dataset.images: {folder} is not a folder of images")
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    caption_suffixes = {".txt", caption_extension.lower()}
    candidates = []
    for path in entries:
        if not path.is_file() or _is_clutter(path, folder):
            continue
        if path.suffix.lower() in caption_suffixes and path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        candidates.append(path)
    return candidates


def find_caption(image: Path, caption_extension: str = ".txt") -> Path | None:
    """The sidecar of `image`: name + caption_extension first, then name.txt (AUTOMATIC1111's default)."""
    for suffix in dict.fromkeys((caption_extension, ".txt")):
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            return sidecar
    return None


def _looks_misdecoded(text: str) -> bool:
    # GBK bytes often also decode as Shift_JIS, into half-width katakana no real caption uses
    return any("\uff61" <= ch <= "\uff9f" or "\x80" <= ch <= "\x9f" for ch in text)


def read_caption(path: Path) -> str:
    """A caption sidecar's text in any encoding users' editors write (UTF-8 with or without BOM, Shift_JIS, GBK)."""
    raw = path.read_bytes()
    doubtful = []
    for encoding in CAPTION_ENCODINGS:
        try:
            text = raw.decode(encoding).strip()
        except UnicodeDecodeError:
            continue
        if encoding == "utf-8-sig" or not _looks_misdecoded(text):
            return text
        doubtful.append((encoding, text))
    if doubtful:  # every legacy decoding looked odd: the first that worked is the best guess
        encoding, text = doubtful[0]
        log.warning("caption %s: text encoding unclear, read as %s; save it as UTF-8 to be sure", path, encoding)
        return text
    raise SkipImage(f"caption {path.name} is in an unknown text encoding (tried {', '.join(CAPTION_ENCODINGS)}); save it as UTF-8")

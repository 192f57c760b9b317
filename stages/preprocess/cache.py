"""The per-image cache: what processing one file's content with one settings key produced.

It lives outside Snakemake's declared outputs ({out_dir}/cache/preprocess/), so a rerun after
adding one image to a folder of 1,000 decodes and frames that one image and reuses the rest.
Layout: {root}/{settings key}/{content sha256[:2]}/{content sha256}.json plus its images; the
JSON record is written last, so a record on disk means its images are complete.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from stages.common.files import prune_tree, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class FramedPart:
    """One training image made from a source (a source gives several when split)."""

    file: str  # image file name inside the cache entry's folder
    crop_box: tuple[float, float, float, float]  # in upright source pixels
    out_width: int
    out_height: int
    bucket: str = ""  # "WxH" in bucket mode


@dataclass
class ImageRecord:
    """The outcome of one (content, settings): framed parts, or the reason the file was skipped."""

    status: str  # "kept" | "skipped" | "ignored" (not an image, and not named like one)
    reason: str = ""
    width: int = 0  # upright size of the source
    height: int = 0
    animated: bool = False  # an animated GIF/WebP/PNG, of which the first frame was used
    pixel_sha256: str = ""
    dhash: str = ""  # perceptual hash and colour layout, for near-duplicates
    colours: str = ""
    parts: list[FramedPart] = field(default_factory=list)
    debug_file: str = ""  # focal-point debug image, when asked for


class ImageCache:
    def __init__(self, root: Path, settings_key: str):
        self.folder = root / settings_key

    def entry_folder(self, content_sha256: str) -> Path:
        return self.folder / content_sha256[:2]

    def _record_path(self, content_sha256: str) -> Path:
        return self.entry_folder(content_sha256) / f"{content_sha256}.json"

    def load(self, content_sha256: str) -> ImageRecord | None:
        """The stored record, or None when missing, unreadable or incomplete (then it is simply redone)."""
        path = self._record_path(content_sha256)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            parts = [FramedPart(**{**part, "crop_box": tuple(part["crop_box"])}) for part in data.pop("parts")]
            record = ImageRecord(**data, parts=parts)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("cache entry %s is unreadable (%s); processing the image again", path, exc)
            return None
        files = [part.file for part in record.parts] + ([record.debug_file] if record.debug_file else [])
        if not all((self.entry_folder(content_sha256) / name).is_file() for name in files):
            return None
        return record

    def store(self, content_sha256: str, record: ImageRecord) -> None:
        """Write the record (its image files must already be in entry_folder)."""
        write_text_atomic(self._record_path(content_sha256), json.dumps(dataclasses.asdict(record), indent=1))

    def file_path(self, content_sha256: str, name: str) -> Path:
        return self.entry_folder(content_sha256) / name


def prune_cache(root: Path, settings_key: str, keep_contents: set[str]) -> tuple[int, int]:
    """Delete every entry under `root` except this settings key's entries for `keep_contents`: (files, bytes) freed.

    Entry files are named after their content hash (`<sha>.json`, `<sha>-<n>.png`, `<sha>-focal.jpg`);
    leftovers of interrupted writes (`.<name>.partial`) match no hash and go too.
    """
    def in_use(path: Path) -> bool:
        return path.relative_to(root).parts[0] == settings_key and path.name.split(".")[0].split("-")[0] in keep_contents

    return prune_tree(root, in_use)

"""Putting cached images into the preprocess folder under readable, unique names; clearing what is stale."""
from __future__ import annotations

import os
import re
import shutil
import unicodedata
from pathlib import Path

from stages.common.files import atomic_path, write_text_atomic

DEBUG_FOLDER = "focal_debug"


def output_names(source: Path, root: Path, digest: str, parts: int, taken: set[str]) -> tuple[str, list[str]]:
    """(stem, PNG names) for a source's `parts` images, from its path under `root`, unique within this run.

    Letters of any script survive (a Japanese file name stays readable); spaces, slashes and
    symbols become "_"; a split source's images end in -part1, -part2, ... A clash (same name
    in two subfolders, names that reduce alike) gets the first 8 digits of the content hash.
    """
    relative = source.relative_to(root).with_suffix("") if source.is_relative_to(root) else Path(source.stem)
    text = unicodedata.normalize("NFC", "_".join(relative.parts))  # macOS writes decomposed names
    stem = re.sub(r"[^\w.-]+", "_", text).strip("._") or "image"

    def names_for(base: str) -> list[str]:
        return [f"{base}.png"] if parts == 1 else [f"{base}-part{i}.png" for i in range(1, parts + 1)]

    def claimed(base: str) -> set[str]:  # a split source also claims base.png, so its base.txt caption is its own
        return {name.lower() for name in names_for(base) + [f"{base}.png"]}

    if claimed(stem) & taken:  # compare case-blind: the disk may be case-insensitive
        stem = f"{stem}-{digest[:8]}"
    taken.update(claimed(stem))
    return stem, names_for(stem)


def place_file(cached: Path, target: Path) -> None:
    """Make `target` hold `cached`'s bytes: a hard link when the disk allows (no copy), else a copy; atomic either way."""
    if target.exists() and os.path.samefile(cached, target):
        return
    with atomic_path(target) as temp:
        temp.unlink()
        try:
            os.link(cached, temp)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(cached, temp)


def write_caption(target: Path, text: str) -> None:
    """Write a UTF-8 caption unless the same text is already there (keeps unchanged files untouched)."""
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(target, text)


def remove_stale(out_dir: Path, keep: set[str]) -> list[str]:
    """Drop images and captions of earlier runs whose source is gone, so nothing stale is trained on."""
    removed = []
    for folder, suffixes in ((out_dir, (".png", ".txt")), (out_dir / DEBUG_FOLDER, (".jpg",))):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = path.relative_to(out_dir).as_posix()
            if path.is_file() and path.suffix in suffixes and name not in keep:
                path.unlink()
                removed.append(name)
    return removed

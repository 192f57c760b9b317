"""The preprocess stage's work: every source image → one framed PNG, its caption, a manifest row."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from stages.common.demo_data import DEMO_NAME, write_demo_dataset
from stages.common.files import atomic_path, hash_file, write_csv_atomic, write_text_atomic
from stages.preprocess.images import SkipImage, frame_center, frame_none, frame_pad, list_source_files, load_rgb, read_caption

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["source", "sha256", "output", "caption", "caption_source", "width", "height", "crop_box", "out_width", "out_height"]


@dataclass(frozen=True)
class PreprocessSettings:
    size: tuple[int, int]
    mode: str = "center"
    flip: bool = False
    background: tuple[int, int, int] = (255, 255, 255)
    min_side: int = 64  # smaller sources carry too little detail to train on

    @classmethod
    def from_section(cls, section: dict) -> "PreprocessSettings":
        size = section["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if section["mode"] in ("focal", "bucket"):
            raise ValueError(f"preprocess.mode: {section['mode']!r} is not available in this version; use center, pad or none")
        return cls(size=size, mode=section["mode"], flip=section["flip"])


@dataclass
class PreprocessSummary:
    kept: int
    skipped: int


def _output_stem(source: Path, digest: str, taken: set[str]) -> str:
    stem = re.sub(r"[^\w.-]+", "_", source.stem, flags=re.ASCII).strip("._") or "image"
    if stem in taken:  # same name in two subfolders, or a name reduced to the same ASCII
        stem = f"{stem}-{digest[:8]}"
    taken.add(stem)
    return stem


def resolve_source(images: str, out_dir: Path) -> Path:
    """The folder to read: the user's, or builtin:demo written next to the outputs."""
    if images == DEMO_NAME:
        folder = out_dir / "demo_source"
        write_demo_dataset(folder)
        return folder
    return Path(images)


def frame_image(image, settings: PreprocessSettings):
    if settings.mode == "center":
        return frame_center(image, settings.size)
    if settings.mode == "pad":
        return frame_pad(image, settings.size, settings.background)
    return frame_none(image)


def preprocess_folder(
    source: Path,
    out_dir: Path,
    settings: PreprocessSettings,
    progress: Callable[[Iterable], Iterable] = lambda items: items,
) -> PreprocessSummary:
    """Frame every image of `source` into `out_dir`; write manifest.csv and skipped.csv there."""
    images, others = list_source_files(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, skipped, taken = [], [], set()
    seen_hashes: dict[str, str] = {}
    for path in progress(images):
        try:
            digest = hash_file(path)
            if digest in seen_hashes:
                raise SkipImage(f"same file content as {seen_hashes[digest]}")
            image = load_rgb(path, settings.background)
            if min(image.size) < settings.min_side:
                raise SkipImage(f"too small ({image.width}x{image.height}, minimum side {settings.min_side})")
            caption = read_caption(path.with_suffix(".txt"))
        except SkipImage as reason:
            log.warning("skipped %s: %s", path, reason)
            skipped.append({"file": str(path), "reason": str(reason)})
            continue
        seen_hashes[digest] = path.name
        framed, box = frame_image(image, settings)
        stem = _output_stem(path, digest, taken)
        with atomic_path(out_dir / f"{stem}.png") as temp:
            framed.save(temp, format="PNG")
        if caption is not None:
            write_text_atomic(out_dir / f"{stem}.txt", caption)
        rows.append(
            {
                "source": str(path),
                "sha256": digest,
                "output": f"{stem}.png",
                "caption": f"{stem}.txt" if caption is not None else "",
                "caption_source": "sidecar" if caption is not None else "",
                "width": image.width,
                "height": image.height,
                "crop_box": " ".join(map(str, box)),
                "out_width": framed.width,
                "out_height": framed.height,
            }
        )
    for path in others:
        skipped.append({"file": str(path), "reason": f"not an image file ({path.suffix or 'no extension'})"})
    _remove_stale(out_dir, {row["output"] for row in rows} | {row["caption"] for row in rows if row["caption"]})
    write_csv_atomic(out_dir / "skipped.csv", pd.DataFrame(skipped, columns=["file", "reason"]))
    if not rows:
        raise ValueError(f"dataset.images: no usable image in {source} ({len(skipped)} skipped, see {out_dir / 'skipped.csv'})")
    write_csv_atomic(out_dir / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    return PreprocessSummary(kept=len(rows), skipped=len(skipped))


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Drop images and captions of an earlier run whose source is gone, so nothing stale is trained on."""
    for path in out_dir.iterdir():
        if path.suffix in (".png", ".txt") and path.name not in keep:
            path.unlink()

"""The preprocess stage's work: every source image → framed PNG(s), its caption, manifest rows.

Sources are processed in parallel worker processes through a cache keyed by (file content,
settings), so only new or changed images are decoded; this module then collapses duplicates,
reports near-duplicates, names the outputs and writes manifest.csv, skipped.csv and
near_duplicates.csv.
"""
from __future__ import annotations

import functools
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd

from stages.common.demo_data import DEMO_NAME, write_demo_dataset
from stages.common.files import write_csv_atomic
from stages.common.text import plural
from stages.preprocess.buckets import make_bucket_resolutions
from stages.preprocess.cache import ImageCache, prune_cache
from stages.preprocess.duplicates import find_near_duplicates
from stages.preprocess.outputs import DEBUG_FOLDER, output_names, place_file, remove_stale, write_caption
from stages.preprocess.process import SourceOutcome, process_source
from stages.preprocess.settings import PreprocessSettings
from stages.preprocess.sources import SkipImage, find_caption, list_source_files, read_caption
from stages.common.errors import InputError

__all__ = ["PreprocessSettings", "PreprocessSummary", "preprocess_folder", "resolve_source"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "source", "sha256", "output", "part", "caption", "caption_source", "width", "height",
    "crop_box", "bucket", "out_width", "out_height", "flip", "duplicates",
]
Progress = Callable[[Iterable, int], Iterable]


@dataclass
class PreprocessSummary:
    kept: int  # source images with outputs
    images: int  # training images written (a split source gives several)
    skipped: int  # files listed in skipped.csv, duplicates included
    duplicates: int  # exact duplicates collapsed into an earlier image
    near_duplicates: int  # pairs listed in near_duplicates.csv
    processed: int  # sources decoded and framed in this run
    reused: int  # sources whose framed images came from the cache
    ignored: int = 0  # stray files that are not images (notes, documents)
    pruned_files: int = 0  # cache files deleted by preprocess.prune
    pruned_bytes: int = 0

    def line(self) -> str:
        split = f" as {self.images} images" if self.images != self.kept else ""
        pruned = f"; {self.pruned_files} unused cache files pruned ({self.pruned_bytes / 1e6:.1f} MB)" if self.pruned_files else ""
        return (f"{self.kept} kept{split}, {self.skipped - self.duplicates} skipped, {plural(self.duplicates, 'duplicate')}, "
                f"{plural(self.near_duplicates, 'near-duplicate pair')} ({self.processed} processed, {self.reused} from cache){pruned}")


@dataclass
class _Kept:
    outcome: SourceOutcome
    caption: str | None
    caption_file: Path | None
    duplicates: list[Path] = field(default_factory=list)


def resolve_source(images: str, out_dir: Path) -> Path:
    """The folder to read: the user's, or builtin:demo written next to the outputs."""
    if images == DEMO_NAME:
        folder = out_dir / "demo_source"
        write_demo_dataset(folder)
        return folder
    return Path(images)


def run_workers(paths: list[Path], settings: PreprocessSettings, cache_dir: Path, workers: int) -> Iterator[SourceOutcome]:
    """process_source over `paths` in order, on `workers` processes (in this process when 1)."""
    job = functools.partial(process_source, settings=settings, cache_root=cache_dir)
    if workers <= 1 or len(paths) <= 1:
        yield from map(job, paths)
        return
    workers = min(workers, len(paths))
    chunk = max(1, min(16, len(paths) // (workers * 8)))  # cache hits are quick; batch them to save round trips
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(job, paths, chunksize=chunk)


def preprocess_folder(
    source: Path,
    out_dir: Path,
    settings: PreprocessSettings,
    cache_dir: Path | None = None,
    workers: int = 1,
    progress: Progress = lambda items, total: items,
) -> PreprocessSummary:
    """Frame every image of `source` into `out_dir`; write manifest.csv, skipped.csv and near_duplicates.csv there.

    `cache_dir` (default: {out_dir}/../cache/preprocess) holds the framed images between runs.
    Raises ValueError, after writing skipped.csv, when no image is usable.
    """
    warn_if_one_bucket(settings)
    paths = list_source_files(source, settings.recursive, settings.caption_extension)
    cache_dir = cache_dir if cache_dir is not None else out_dir.parent / "cache" / "preprocess"
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = list(progress(run_workers(paths, settings, cache_dir, workers), len(paths)))
    kept, skipped, duplicates = _select(outcomes, settings)
    fingerprints = {str(k.outcome.path): (k.outcome.record.dhash, k.outcome.record.colours) for k in kept}
    near = find_near_duplicates(fingerprints, settings.near_duplicate_distance)
    for pair in near[:20]:
        log.warning("near-duplicates (%d of 64 hash bits differ): %s and %s", pair.distance, pair.first, pair.second)
    if len(near) > 20:
        log.warning("%d more near-duplicate pairs are listed in %s", len(near) - 20, out_dir / "near_duplicates.csv")
    rows, written = _write_outputs(kept, source, out_dir, ImageCache(cache_dir, settings.cache_key()), settings)
    remove_stale(out_dir, written)
    write_csv_atomic(out_dir / "skipped.csv", pd.DataFrame(skipped, columns=["file", "reason"]))
    write_csv_atomic(out_dir / "near_duplicates.csv", pd.DataFrame([vars(p) for p in near], columns=["first", "second", "distance"]))
    ignored = sum(o.record.status == "ignored" for o in outcomes)
    if not rows:
        # the reasons go in the message itself: Snakemake deletes skipped.csv, a declared output, when the job fails
        reasons = "".join(f"\n  {Path(row['file']).name}: {row['reason']}" for row in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        raise InputError(
            f"dataset.images: no usable image in {source}: {plural(len(skipped), 'file')} skipped"
            f"{f', {ignored} ignored as not images' if ignored else ''}; add JPEG/PNG/WebP images or fix the skipped ones:{reasons}{more}"
        )
    write_csv_atomic(out_dir / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    processed = sum(not o.reused and o.record.status != "ignored" and o.content_sha256 != "" for o in outcomes)
    summary = PreprocessSummary(kept=len(kept), images=len(rows), skipped=len(skipped), duplicates=duplicates,
                                near_duplicates=len(near), processed=processed, reused=sum(o.reused for o in outcomes), ignored=ignored)
    if settings.prune:
        summary.pruned_files, summary.pruned_bytes = prune_cache(cache_dir, settings.cache_key(), {o.content_sha256 for o in outcomes})
    return summary


def warn_if_one_bucket(settings: PreprocessSettings) -> list[tuple[int, int]]:
    """Bucket mode promises each image keeps its shape; say so when the settings leave only one bucket."""
    if settings.mode != "bucket":
        return []
    buckets = make_bucket_resolutions(settings.size[0] * settings.size[1], settings.bucket_min_side, settings.bucket_max_side, settings.bucket_step)
    if len(buckets) == 1:
        width, height = buckets[0]
        log.warning("preprocess.mode: bucket has a single bucket, %dx%d, at size %s with bucket_min_side %d: every image is cropped "
                    "to that square. Lower preprocess.bucket_min_side (to %d, say) so other shapes get buckets",
                    width, height, "x".join(map(str, settings.size)), settings.bucket_min_side, max(settings.bucket_step, width // 2))
    return buckets


def _select(outcomes: list[SourceOutcome], settings: PreprocessSettings) -> tuple[list[_Kept], list[dict], int]:
    """The usable sources (one per set of duplicates), the skip rows, the duplicate count.

    Of two copies of one picture, the one with a caption is kept, and of two captions the richer
    (more words); otherwise the first in path order. The other copy is listed as a duplicate.
    """
    kept: list[_Kept] = []
    skipped: list[dict] = []
    first_with: dict[str, _Kept] = {}  # content or pixel digest → the source kept for it
    duplicates = 0
    for outcome in outcomes:
        record, path = outcome.record, outcome.path
        if record.status == "ignored":
            log.debug("ignored %s: %s", path, record.reason)
            continue
        if record.status == "skipped":
            log.warning("skipped %s: %s", path, record.reason)
            skipped.append({"file": str(path), "reason": record.reason})
            continue
        try:
            caption_file = find_caption(path, settings.caption_extension)
            caption = read_caption(caption_file) if caption_file is not None else None
        except (SkipImage, OSError) as problem:
            reason = f"caption unreadable: {problem}" if isinstance(problem, OSError) else str(problem)
            log.warning("skipped %s: %s", path, reason)
            skipped.append({"file": str(path), "reason": reason})
            continue
        original = first_with.get(outcome.content_sha256) or first_with.get(record.pixel_sha256)
        if original is None:
            entry = _Kept(outcome, caption, caption_file)
            kept.append(entry)
            first_with[outcome.content_sha256] = first_with[record.pixel_sha256] = entry
            continue
        same = "file content" if original.outcome.content_sha256 == outcome.content_sha256 else "pixels"
        duplicates += 1
        if _caption_words(caption) > _caption_words(original.caption):
            # this copy carries the caption: keep it in the original's place
            dropped, richer = original.outcome.path, "richer caption" if original.caption else "caption"
            original.outcome, original.caption, original.caption_file = outcome, caption, caption_file
            first_with[outcome.content_sha256] = original
            reason = f"duplicate: same {same} as {path}, which was kept instead for its {richer}"
        else:
            dropped = path
            reason = f"duplicate: same {same} as {original.outcome.path}; collapsed into it"
        log.warning("%s and %s are the same picture: kept %s%s", dropped, original.outcome.path, original.outcome.path,
                    " for its caption" if dropped != path else ", the first in path order")
        skipped.append({"file": str(dropped), "reason": reason})
        original.duplicates.append(dropped)
    return kept, skipped, duplicates


def _caption_words(caption: str | None) -> int:
    """How much a caption says: its words (tags count by their words too); no caption says nothing."""
    return len(caption.replace(",", " ").split()) if caption else 0


def _write_outputs(kept: list[_Kept], root: Path, out_dir: Path, cache: ImageCache, settings: PreprocessSettings) -> tuple[list[dict], set[str]]:
    """Place each kept source's images and caption in `out_dir`: (one manifest row per image, every file written)."""
    rows, taken, written = [], set(), set()
    for entry in kept:
        outcome, record = entry.outcome, entry.outcome.record
        digest = outcome.content_sha256
        stem, outputs = output_names(outcome.path, root, digest, len(record.parts), taken)
        caption_name = f"{stem}.txt" if entry.caption is not None else ""
        if caption_name:
            write_caption(out_dir / caption_name, entry.caption)
            written.add(caption_name)
        if record.debug_file:
            place_file(cache.file_path(digest, record.debug_file), out_dir / DEBUG_FOLDER / f"{stem}.jpg")
            written.add(f"{DEBUG_FOLDER}/{stem}.jpg")
        caption_source = entry.caption_file.relative_to(root) if entry.caption_file and entry.caption_file.is_relative_to(root) else entry.caption_file
        for index, (output, part) in enumerate(zip(outputs, record.parts), start=1):
            place_file(cache.file_path(digest, part.file), out_dir / output)
            written.add(output)
            rows.append({
                "source": str(outcome.path),
                "sha256": digest,
                "output": output,
                "part": index if len(outputs) > 1 else 0,
                "caption": caption_name,
                "caption_source": str(caption_source or ""),
                "width": record.width,
                "height": record.height,
                "crop_box": " ".join(f"{v:g}" for v in part.crop_box),
                "bucket": part.bucket,
                "out_width": part.out_width,
                "out_height": part.out_height,
                "flip": settings.flip,
                "duplicates": "; ".join(str(p) for p in entry.duplicates),
            })
    return rows, written

"""Choosing each image's caption and writing caption/{image}.txt, captions.csv and tags.csv.

The methods are tried in order until one gives text (AUTOMATIC1111 and kohya users chain
them by hand: keep the sidecars, tag what has none, fall back to the file name).
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pandas as pd

from stages.caption.settings import CaptionSettings, FilenameRule
from stages.caption.tag_selection import caption_from_scores
from stages.caption.tagging import TAGS_COLUMNS, score_images, tag_rows
from stages.common.files import write_csv_atomic, write_text_atomic
from stages.common.errors import InputError, MissingInput

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ["image", "caption_file", "caption", "source"]
AUTOMATIC1111_FILENAME = FilenameRule(word_regex="", join=" ")
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # AUTOMATIC1111's re_numbers_at_start
_COMBINE_SEPARATOR = ", "  # between a sidecar and generated text (AUTOMATIC1111 uses a space, which runs tags together)


@dataclass
class CaptionRecord:
    image: str  # the preprocessed PNG's name
    caption_file: str
    caption: str
    source: str  # the method that gave the text: existing, filename, tagger, none, or existing+tagger etc.


@dataclass
class CaptionSummary:
    table: pd.DataFrame  # captions.csv
    tagged: int = 0  # images the tagger model ran on
    tags_reused: int = 0  # images captioned by the tagger from cached scores


def caption_from_filename(source_name: str, rule: FilenameRule = AUTOMATIC1111_FILENAME) -> str:
    """AUTOMATIC1111's [filewords] rule: drop the extension and leading digits/dashes, then apply the word regex.

    '000001-1-a man in suit.png' → 'a man in suit'; with word_regex '\\w+' and join ', ' → 'a, man, in, suit'.
    """
    text = _LEADING_NUMBERS.sub("", Path(source_name).stem)
    if rule.word_regex:
        text = rule.join.join(re.findall(rule.word_regex, text))
    return text.strip()


def first_method_with_text(methods: tuple[str, ...], texts: Mapping[str, str]) -> str | None:
    """The method whose text becomes the caption; None when it depends on a text not computed yet."""
    for method in methods:
        if method == "none":
            return "none"
        if method not in texts:
            return None
        if texts[method]:
            return method
    return "none"


def combine_with_sidecar(method: str, text: str, sidecar: str, action: str) -> tuple[str, str]:
    """AUTOMATIC1111's existing-caption actions, for an image whose caption came from another method."""
    if method == "existing" or not sidecar or action == "ignore":
        return text, method
    if action == "copy" or not text:
        return sidecar, "existing"
    if action == "prepend":
        return f"{sidecar}{_COMBINE_SEPARATOR}{text}", f"existing+{method}"
    return f"{text}{_COMBINE_SEPARATOR}{sidecar}", f"{method}+existing"


def _read_sidecar(preprocess_dir: Path, name: str) -> str:
    if not name:
        return ""
    path = preprocess_dir / name
    try:
        return path.read_text(encoding="utf-8-sig").strip()  # preprocess writes UTF-8 whatever the user's editor used
    except FileNotFoundError:
        raise MissingInput(f"{path} is listed in {preprocess_dir / 'manifest.csv'} but missing; rerun preprocess") from None


def _read_manifest(preprocess_dir: Path) -> pd.DataFrame:
    path = preprocess_dir / "manifest.csv"
    if not path.is_file():
        raise MissingInput(f"{path} does not exist; run the preprocess stage first")
    manifest = pd.read_csv(path, keep_default_na=False, dtype=str)
    missing = [column for column in ("output", "caption", "source") if column not in manifest.columns]
    if missing:
        raise InputError(f"{path} has no {', '.join(missing)} column; rerun preprocess with this version of tiflow")
    return manifest


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite a caption only when its text changed, so unchanged captions keep their timestamps."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text_atomic(path, text)


def write_captions(
    preprocess_dir: Path,
    out_dir: Path,
    settings: CaptionSettings | str | list[str],
    store: Path | None = None,
    threads: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda batches: batches,
) -> CaptionSummary:
    """Write one UTF-8 caption per image of preprocess_dir/manifest.csv, captions.csv and (with a tagger) tags.csv.

    `store` holds the tagger's per-image scores between runs (default: {out_dir}/../cache/tagger).
    """
    if not isinstance(settings, CaptionSettings):
        settings = CaptionSettings.from_section(settings)
    manifest = _read_manifest(preprocess_dir)
    sidecars = [_read_sidecar(preprocess_dir, name) for name in manifest.caption]
    texts = []
    for record, sidecar in zip(manifest.itertuples(), sidecars):
        known = {"existing": sidecar}
        if "filename" in settings.methods:
            known["filename"] = caption_from_filename(Path(record.source).name, settings.filename)
        texts.append(known)

    # the tagger runs only for images the chain reaches it with, in batches
    needs_tagger = {record.output: preprocess_dir / record.output
                    for record, known in zip(manifest.itertuples(), texts) if first_method_with_text(settings.methods, known) is None}
    summary = CaptionSummary(table=pd.DataFrame(columns=CAPTION_COLUMNS))
    tag_tables = []
    if needs_tagger:
        scored = score_images(needs_tagger, settings.tagger, store or out_dir.parent / "cache" / "tagger", threads, progress)
        summary.tagged, summary.tags_reused = scored.computed, scored.reused
        for (record, known) in zip(manifest.itertuples(), texts):
            if record.output in scored.scores:
                known["tagger"], choice = caption_from_scores(scored.scores[record.output], scored.table, settings.tagger)
                tag_tables.append(tag_rows(record.output, scored.scores[record.output], scored.table, choice, settings.tagger.scores_min))

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for record, sidecar, known in zip(manifest.itertuples(), sidecars, texts):
        method = first_method_with_text(settings.methods, known) or "none"
        text, source = combine_with_sidecar(method, known.get(method, ""), sidecar, settings.existing_action)
        if source == "none":
            log.info("%s: no method in %s gave a caption; its caption is empty", record.source, list(settings.methods))
        caption_file = Path(record.output).with_suffix(".txt").name
        _write_if_changed(out_dir / caption_file, text)
        records.append(CaptionRecord(record.output, caption_file, text, source))

    keep = {record.caption_file for record in records}
    for stale in out_dir.glob("*.txt"):  # captions of images that are gone would otherwise linger
        if stale.name not in keep:
            stale.unlink()
    if settings.uses_tagger:
        tags = pd.concat(tag_tables, ignore_index=True) if tag_tables else pd.DataFrame(columns=TAGS_COLUMNS)
        write_csv_atomic(out_dir / "tags.csv", tags)
    else:
        (out_dir / "tags.csv").unlink(missing_ok=True)  # scores of an earlier tagger run no longer describe these captions
    summary.table = pd.DataFrame([asdict(r) for r in records], columns=CAPTION_COLUMNS)
    write_csv_atomic(out_dir / "captions.csv", summary.table)
    return summary

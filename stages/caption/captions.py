"""Choosing each image's caption and writing caption/{image}.txt, captions.csv and tags.csv.

The methods are tried in order until one gives text (AUTOMATIC1111 and kohya users chain
them by hand: keep the sidecars, tag what has none, fall back to the file name). The combine
step joins several methods' texts, e.g. the tags and then a BLIP sentence. A model runs only
for the images the chain reaches it with.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pandas as pd

from stages.caption.score_cache import MethodRun
from stages.caption.settings import MODEL_METHODS, CaptionSettings, FilenameRule
from stages.caption.tag_selection import caption_from_scores
from stages.caption.tagging import TAGS_COLUMNS, score_images, tag_rows
from stages.common.files import write_csv_atomic, write_text_atomic
from stages.common.errors import InputError, MissingInput

log = logging.getLogger(__name__)

CAPTION_COLUMNS = ["image", "caption_file", "caption", "source"]
AUTOMATIC1111_FILENAME = FilenameRule(word_regex="", join=" ")
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")  # AUTOMATIC1111's re_numbers_at_start
_COMBINE_SEPARATOR = ", "  # between a sidecar and generated text (AUTOMATIC1111 uses a space, which runs tags together)
_JOIN_SEPARATOR = ", "  # between the texts of the combine step, as AUTOMATIC1111's preprocess joins BLIP and deepbooru


@dataclass
class CaptionRecord:
    image: str  # the preprocessed PNG's name
    caption_file: str
    caption: str
    source: str  # the method(s) that gave the text: existing, filename, tagger, deepbooru, blip, none, tagger+blip, existing+tagger etc.


@dataclass
class CaptionSummary:
    table: pd.DataFrame  # captions.csv
    runs: dict[str, MethodRun] = field(default_factory=dict)  # per model method: images run, images from the cache, seconds

    @property
    def tagged(self) -> int:
        """Images the tagger model ran on."""
        return self.runs["tagger"].computed if "tagger" in self.runs else 0

    @property
    def tags_reused(self) -> int:
        """Images captioned by the tagger from cached scores."""
        return self.runs["tagger"].reused if "tagger" in self.runs else 0


def caption_from_filename(source_name: str, rule: FilenameRule = AUTOMATIC1111_FILENAME) -> str:
    """AUTOMATIC1111's [filewords] rule: drop the extension and leading digits/dashes, then apply the word regex.

    '000001-1-a man in suit.png' → 'a man in suit'; with word_regex '\\w+' and join ', ' → 'a, man, in, suit'.
    """
    text = _LEADING_NUMBERS.sub("", Path(source_name).stem)
    if rule.word_regex:
        text = rule.join.join(re.findall(rule.word_regex, text))
    return text.strip()


def _step_parts(step: str, combine: tuple[str, ...]) -> tuple[str, ...]:
    return combine if step == "combine" else (step,)


def step_text(step: str, texts: Mapping[str, str], combine: tuple[str, ...] = ()) -> tuple[str, str]:
    """A chain step's text and source: one method's, or the combine step's texts joined in order (empty ones left out)."""
    given = [(part, texts[part]) for part in _step_parts(step, combine) if texts[part]]
    return _JOIN_SEPARATOR.join(text for _, text in given), "+".join(part for part, _ in given)


def first_method_with_text(methods: tuple[str, ...], texts: Mapping[str, str], combine: tuple[str, ...] = ()) -> str | None:
    """The step whose text becomes the caption; None when it depends on a text not computed yet."""
    return _walk(methods, texts, combine)[0]


def methods_to_run(methods: tuple[str, ...], texts: Mapping[str, str], combine: tuple[str, ...] = ()) -> list[str]:
    """The methods whose texts the chain needs next for this image (none when its caption is decided)."""
    return _walk(methods, texts, combine)[1]


def _walk(methods, texts, combine) -> tuple[str | None, list[str]]:
    for step in methods:
        if step == "none":
            return "none", []
        missing = [part for part in _step_parts(step, combine) if part not in texts]
        if missing:
            return None, missing
        if step_text(step, texts, combine)[0]:
            return step, []
    return "none", []


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
    progress: Callable[[list, str], Iterable] = lambda batches, method: batches,
) -> CaptionSummary:
    """Write one UTF-8 caption per image of preprocess_dir/manifest.csv, captions.csv and (with a tagger) tags.csv.

    `store` holds the models' per-image results between runs (default: {out_dir}/../cache/tagger).
    `progress(batches, method)` wraps each model's batches (a progress bar at the command line).
    """
    if not isinstance(settings, CaptionSettings):
        settings = CaptionSettings.from_section(settings)
    store = store or out_dir.parent / "cache" / "tagger"
    manifest = _read_manifest(preprocess_dir)
    names = list(manifest.output)
    sidecars = [_read_sidecar(preprocess_dir, name) for name in manifest.caption]
    texts: dict[str, dict[str, str]] = {}
    for record, sidecar in zip(manifest.itertuples(), sidecars):
        texts[record.output] = {"existing": sidecar}
        if settings.uses("filename"):
            texts[record.output]["filename"] = caption_from_filename(Path(record.source).name, settings.filename)

    # each pass runs the models the chains need next, each on the images that need it, until every caption is decided
    summary = CaptionSummary(table=pd.DataFrame(columns=CAPTION_COLUMNS))
    tag_tables: dict[tuple[str, str], pd.DataFrame] = {}  # (image, method) → its tags.csv rows
    while True:
        needed: dict[str, dict[str, Path]] = {}
        for name in names:
            for method in methods_to_run(settings.methods, texts[name], settings.combine):
                needed.setdefault(method, {})[name] = preprocess_dir / name
        if not needed:
            break
        if needed.keys() - set(MODEL_METHODS):  # every other method's text is known before the first pass
            raise InputError(f"caption.method: {sorted(needed.keys() - set(MODEL_METHODS))} gave no text to the chain")
        if threads and needed.keys() & {"deepbooru", "blip"}:
            import torch

            torch.set_num_threads(threads)
        for method in MODEL_METHODS:
            if method in needed:
                run = _run_method(method, needed[method], settings, store, threads, progress, texts, tag_tables)
                _add_run(summary.runs, run)

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for record, sidecar in zip(manifest.itertuples(), sidecars):
        known = texts[record.output]
        step = first_method_with_text(settings.methods, known, settings.combine) or "none"
        text, method = step_text(step, known, settings.combine) if step != "none" else ("", "none")
        text, source = combine_with_sidecar(method, text, sidecar, settings.existing_action)
        if source == "none":
            log.info("%s: no method in %s gave a caption; its caption is empty", record.source, list(settings.methods))
        caption_file = Path(record.output).with_suffix(".txt").name
        _write_if_changed(out_dir / caption_file, text)
        records.append(CaptionRecord(record.output, caption_file, text, source))

    keep = {record.caption_file for record in records}
    for stale in out_dir.glob("*.txt"):  # captions of images that are gone would otherwise linger
        if stale.name not in keep:
            stale.unlink()
    if settings.uses("tagger") or settings.uses("deepbooru"):
        order = [(name, method) for name in names for method in ("tagger", "deepbooru") if (name, method) in tag_tables]
        tags = pd.concat([tag_tables[key] for key in order], ignore_index=True) if order else pd.DataFrame(columns=TAGS_COLUMNS)
        write_csv_atomic(out_dir / "tags.csv", tags)
    else:
        (out_dir / "tags.csv").unlink(missing_ok=True)  # scores of an earlier tagger run no longer describe these captions
    summary.table = pd.DataFrame([asdict(r) for r in records], columns=CAPTION_COLUMNS)
    write_csv_atomic(out_dir / "captions.csv", summary.table)
    return summary


def _run_method(method: str, images: dict[str, Path], settings: CaptionSettings, store: Path, threads: int,
                progress: Callable[[list, str], Iterable], texts: dict[str, dict[str, str]],
                tag_tables: dict[tuple[str, str], pd.DataFrame]) -> MethodRun:
    """Run one model method on `images`; put each image's text in `texts` and its scores' rows in `tag_tables`."""
    if method == "tagger":
        run, table = score_images(images, settings.tagger, store, threads, progress)
        for name in images:
            texts[name]["tagger"], choice = caption_from_scores(run.results[name], table, settings.tagger)
            tag_tables[name, "tagger"] = tag_rows(name, run.results[name], table, choice, settings.tagger.scores_min)
        return run
    if method == "deepbooru":
        from stages.caption.deepbooru import caption_from_deepbooru, deepbooru_rows, score_with_deepbooru  # torch only when used

        run, tags = score_with_deepbooru(images, settings.deepbooru, store, progress)
        for name in images:
            texts[name]["deepbooru"], used = caption_from_deepbooru(tags, run.results[name], settings.deepbooru)
            tag_tables[name, "deepbooru"] = deepbooru_rows(name, tags, run.results[name], used, settings.deepbooru.scores_min, TAGS_COLUMNS)
        return run
    if method == "blip":
        from stages.caption.blip import caption_with_blip  # torch and transformers only when used

        run = caption_with_blip(images, settings.blip, store, progress)
        for name in images:
            texts[name]["blip"] = run.results[name]
        return run
    raise InputError(f"caption.method: {method!r} is not a model method")


def _add_run(runs: dict[str, MethodRun], run: MethodRun) -> None:
    """A method that ran in more than one pass (another chain step reached it later) reports its passes together."""
    if run.method not in runs:
        runs[run.method] = run
        return
    total = runs[run.method]
    total.results.update(run.results)
    total.computed, total.reused, total.seconds = total.computed + run.computed, total.reused + run.reused, total.seconds + run.seconds

"""The tagger path: scores for every image that needs them (from the cache or the model), and tags.csv."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from stages.caption.score_cache import ScoreCache
from stages.caption.settings import TaggerSettings
from stages.caption.tag_selection import TagChoice
from stages.caption.tag_table import CHARACTER, GENERAL, RATING, TagTable, load_tag_table
from stages.caption.tagger_model import load_tagger_input, open_tagger, run_tagger
from stages.common.files import hash_file
from stages.common.errors import InputError

log = logging.getLogger(__name__)

TAGS_COLUMNS = ["image", "method", "tag", "category", "score", "used"]  # method: tagger or deepbooru


@dataclass
class TaggerScores:
    table: TagTable
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # image name → one score per tag
    computed: int = 0  # images the model ran on
    reused: int = 0  # images whose scores came from the cache
    seconds: float = 0.0  # loading and running the model (0 when every score was cached)


def _check_width(width: int, table: TagTable, model: Path) -> None:
    if width != len(table):
        raise InputError(f"caption.tagger: {model} gives {width} scores per image but {table.path} lists {len(table)} tags; "
                         "use the selected_tags.csv that came with this model")


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score_images(
    images: dict[str, Path],
    settings: TaggerSettings,
    store: Path,
    threads: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda batches: batches,
) -> TaggerScores:
    """Scores for each image (name → path): cached ones are read, the rest go through the model in batches."""
    model_path, tags_path = settings.require_files()
    table = load_tag_table(tags_path)
    other = sorted(set(table.categories.tolist()) - {GENERAL, CHARACTER, RATING})
    if other:
        log.info("%s has tags of categories %s; they use the general threshold", tags_path, other)
    cache = ScoreCache(store, hash_file(model_path))
    result = TaggerScores(table)
    pending: dict[str, list[str]] = {}  # image hash → names with that content (scored once)
    for name, path in images.items():
        try:
            digest = hash_file(path)
        except OSError as exc:
            raise InputError(f"caption.tagger: cannot read {path} ({exc}); rerun preprocess") from None
        cached = cache.load(digest)
        if cached is None:
            pending.setdefault(digest, []).append(name)
            continue
        _check_width(len(cached), table, model_path)
        result.scores[name] = cached
        result.reused += 1
    if not pending:
        return result
    start = time.perf_counter()
    model = open_tagger(model_path, settings.threads or threads, settings.device)
    if model.output_width is not None:
        _check_width(model.output_width, table, model_path)
    batch_size = model.fixed_batch or settings.batch_size
    for batch in progress(list(_batches(list(pending), batch_size))):
        inputs = np.stack([load_tagger_input(images[pending[digest][0]], model.side) for digest in batch])
        scores = run_tagger(model, inputs)
        _check_width(scores.shape[1], table, model_path)
        for digest, row in zip(batch, scores):
            cache.save(digest, row)
            result.computed += 1
            result.reused += len(pending[digest]) - 1  # same content under another name
            for name in pending[digest]:
                result.scores[name] = row
    result.seconds = time.perf_counter() - start
    return result


def tag_rows(image: str, scores: np.ndarray, table: TagTable, choice: TagChoice | None, scores_min: float) -> pd.DataFrame:
    """tags.csv rows for one image: every tag scoring at least `scores_min`, the rating tags, and every tag used."""
    used = np.zeros(len(table), dtype=bool)
    if choice is not None:
        used[list(choice.tags)] = True
        if choice.rating is not None:
            used[choice.rating] = True
    keep = np.flatnonzero((scores >= scores_min) | (table.categories == RATING) | used)
    keep = keep[np.lexsort((keep, -scores[keep]))]  # best first; ties in file order, so reruns write the same file
    return pd.DataFrame({
        "image": image,
        "method": "tagger",
        "tag": [table.names[i] for i in keep],
        "category": table.category_names(keep),
        "score": np.round(scores[keep].astype(np.float64), 6),
        "used": used[keep],
    }, columns=TAGS_COLUMNS)

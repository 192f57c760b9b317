"""The tagger path: scores for every image that needs them (from the cache or the model), and tags.csv."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from stages.caption.score_cache import MethodRun, ScoreCache, run_with_cache
from stages.caption.settings import TaggerSettings
from stages.caption.tag_selection import TagChoice
from stages.caption.tag_table import CHARACTER, GENERAL, RATING, TagTable, load_tag_table
from stages.caption.tagger_model import load_tagger_input, open_tagger, run_tagger
from stages.common.files import hash_file
from stages.common.errors import InputError

log = logging.getLogger(__name__)

TAGS_COLUMNS = ["image", "method", "tag", "category", "score", "used"]  # method: tagger or deepbooru


def _check_width(width: int, table: TagTable, model: Path) -> None:
    if width != len(table):
        raise InputError(f"caption.tagger: {model} gives {width} scores per image but {table.path} lists {len(table)} tags; "
                         "use the selected_tags.csv that came with this model")


def score_images(
    images: dict[str, Path],
    settings: TaggerSettings,
    store: Path,
    threads: int = 0,
    progress: Callable[[list, str], Iterable] = lambda batches, method: batches,
) -> tuple[MethodRun, TagTable]:
    """Scores for each image (name → path), from the cache or the model in batches; and the model's tag table."""
    model_path, tags_path = settings.require_files()
    table = load_tag_table(tags_path)
    other = sorted(set(table.categories.tolist()) - {GENERAL, CHARACTER, RATING})
    if other:
        log.info("%s has tags of categories %s; they use the general threshold", tags_path, other)

    def open_model() -> tuple[Callable[[list[Path]], list], int]:
        model = open_tagger(model_path, settings.threads or threads, settings.device)
        if model.output_width is not None:
            _check_width(model.output_width, table, model_path)

        def score(paths: list[Path]) -> list[np.ndarray]:
            scores = run_tagger(model, np.stack([load_tagger_input(path, model.side) for path in paths]))
            _check_width(scores.shape[1], table, model_path)
            return list(scores)

        return score, model.fixed_batch or settings.batch_size

    run = run_with_cache("tagger", images, ScoreCache(store, hash_file(model_path)), open_model, progress)
    for scores in run.results.values():  # cached scores from another tag list would mislabel every tag
        _check_width(len(scores), table, model_path)
    return run, table


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

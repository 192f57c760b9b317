"""The deepbooru method: DeepDanbooru's scores for every image that needs them (cached), and AUTOMATIC1111's tag rules.

caption_from_deepbooru follows the webui's DeepDanbooru.tag_multi (modules/deepbooru.py) line by
line, so a caption is what the webui writes with the same Interrogate settings.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from stages.caption.deepbooru_model import load_deepbooru, load_deepbooru_input, read_weights_only, run_deepbooru
from stages.caption.device import pick_device
from stages.caption.score_cache import MethodRun, ScoreCache, run_with_cache
from stages.caption.settings import DeepbooruSettings
from stages.common.errors import InputError
from stages.common.files import hash_file, write_text_atomic

ESCAPED = re.compile(r"([\\()])")  # the webui's re_special: backslashes and round brackets; square ones stay as they are


def caption_from_deepbooru(tags: list[str] | tuple[str, ...], scores: np.ndarray, settings: DeepbooruSettings) -> tuple[str, list[int]]:
    """The caption the webui writes for these scores, and the indices of the tags in it, in caption order."""
    kept: dict[str, int] = {}  # the webui's probability_dict: tag → its index, in model order
    for index, (tag, score) in enumerate(zip(tags, scores)):
        if score < settings.threshold:
            continue
        if tag.startswith("rating:"):  # rating tags are never written
            continue
        kept[tag] = index
    if settings.sort_alpha:
        order = sorted(kept)
    else:  # best first; equal scores keep model order (sorted is stable)
        order = [tag for tag, _ in sorted(kept.items(), key=lambda item: -scores[item[1]])]
    filtered = {tag.strip().replace(" ", "_") for tag in settings.filter_tags}
    words, used = [], []
    for tag in [tag for tag in order if tag not in filtered]:
        score = scores[kept[tag]]
        text = tag
        if settings.use_spaces:
            text = text.replace("_", " ")
        if settings.escape:
            text = ESCAPED.sub(r"\\\1", text)
        if settings.include_ranks:
            text = f"({text}:{score:.3f})"
        words.append(text)
        used.append(kept[tag])
    return ", ".join(words), used


def score_with_deepbooru(
    images: dict[str, Path],
    settings: DeepbooruSettings,
    store: Path,
    progress: Callable[[list, str], Iterable] = lambda batches, method: batches,
) -> tuple[MethodRun, list[str]]:
    """DeepDanbooru's scores for each image (name → path), from the cache or the model; and the model's tag names.

    The network is built and run only for images without cached scores. Its tag names are kept
    beside the scores, so a run with every score cached reads nothing from the model file but its hash.
    """
    path = settings.require_file()
    cache = ScoreCache(store / "deepbooru", hash_file(path))
    names_file = cache.folder / "tags.json"
    model = None

    def open_model() -> tuple[Callable[[list[Path]], list], int]:
        nonlocal model
        model = load_deepbooru(path, pick_device(settings.device, "caption.deepbooru.device"))
        write_text_atomic(names_file, json.dumps(model.tags, ensure_ascii=False))
        return lambda paths: list(run_deepbooru(model, np.stack([load_deepbooru_input(p) for p in paths]))), settings.batch_size

    run = run_with_cache("deepbooru", images, cache, open_model, progress)
    tags = model.tags if model is not None else _cached_names(names_file, path)
    for name, scores in run.results.items():
        if len(scores) != len(tags):
            raise InputError(f"caption.deepbooru.model: {path} lists {len(tags)} tags but the cached scores of {name} are {len(scores)}; "
                             f"delete {cache.folder} and rerun")
    return run, tags


def _cached_names(names_file: Path, model: Path) -> list[str]:
    """The tag names saved when the model last ran; read again from the model file (weights only) if they are gone."""
    try:
        names = json.loads(names_file.read_text(encoding="utf-8"))
        if isinstance(names, list) and all(isinstance(name, str) for name in names):
            return names
    except (OSError, ValueError):
        pass
    state = read_weights_only(model)
    names = state.get("tags") if isinstance(state, dict) else None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InputError(f"caption.deepbooru.model: {model} has no 'tags' list; give AUTOMATIC1111's model-resnet_custom_v3.pt")
    write_text_atomic(names_file, json.dumps(names, ensure_ascii=False))
    return names


def deepbooru_rows(image: str, tags: list[str], scores: np.ndarray, used: list[int], scores_min: float, columns: list[str]) -> pd.DataFrame:
    """tags.csv rows for one image: every tag scoring at least `scores_min`, and every tag used. DeepDanbooru
    names no categories; its rating:* tags are marked as ratings."""
    used_mask = np.zeros(len(tags), dtype=bool)
    used_mask[used] = True
    keep = np.flatnonzero((scores >= scores_min) | used_mask)
    keep = keep[np.lexsort((keep, -scores[keep]))]  # best first; ties in file order, so reruns write the same file
    return pd.DataFrame({
        "image": image,
        "method": "deepbooru",
        "tag": [tags[i] for i in keep],
        "category": ["rating" if tags[i].startswith("rating:") else "" for i in keep],
        "score": np.round(scores[keep].astype(np.float64), 6),
        "used": used_mask[keep],
    }, columns=columns)

"""The models' results kept between runs, keyed by image content and model file, outside Snakemake's outputs.

Tagger and DeepDanbooru scores, and BLIP sentences: a changed threshold, exclusion or order
re-captions from them without running a model, and a new image runs the models for that image only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from stages.common.errors import InputError
from stages.common.files import atomic_path, hash_file, write_text_atomic

log = logging.getLogger(__name__)


class ScoreCache:
    """One float32 vector per image in {root}/{model hash}/{image hash}.npy."""

    def __init__(self, root: Path, model_hash: str):
        self.folder = root / model_hash[:16]

    def path_for(self, image_hash: str) -> Path:
        return self.folder / f"{image_hash}.npy"

    def load(self, image_hash: str) -> np.ndarray | None:
        path = self.path_for(image_hash)
        if not path.is_file():
            return None
        try:
            scores = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:  # a damaged entry is recomputed, not trusted
            log.warning("tagger cache entry %s is unreadable (%s); the image is tagged again", path, exc)
            return None
        if scores.ndim != 1 or scores.dtype != np.float32:
            log.warning("tagger cache entry %s holds %s %s, not a score vector; the image is tagged again", path, scores.dtype, scores.shape)
            return None
        return scores

    def save(self, image_hash: str, scores: np.ndarray) -> None:
        with atomic_path(self.path_for(image_hash)) as temp, open(temp, "wb") as handle:
            np.save(handle, np.asarray(scores, dtype=np.float32))


class TextCache:
    """One UTF-8 text per image in {root}/{key}/{image hash}.txt: a BLIP sentence, keyed by model files and generation settings."""

    def __init__(self, root: Path, key: str):
        self.folder = root / key[:16]

    def path_for(self, image_hash: str) -> Path:
        return self.folder / f"{image_hash}.txt"

    def load(self, image_hash: str) -> str | None:
        try:
            return self.path_for(image_hash).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:  # a damaged entry is recomputed, not trusted
            log.warning("cache entry %s is unreadable (%s); the image is captioned again", self.path_for(image_hash), exc)
            return None

    def save(self, image_hash: str, text: str) -> None:
        write_text_atomic(self.path_for(image_hash), text)


class Cache(Protocol):
    def load(self, image_hash: str) -> Any | None: ...

    def save(self, image_hash: str, value: Any) -> None: ...


@dataclass
class MethodRun:
    """One model method's pass over the images that needed it: its results and what it cost."""

    method: str
    results: dict[str, Any] = field(default_factory=dict)  # image name → scores (one per tag) or a sentence
    computed: int = 0  # images the model ran on
    reused: int = 0  # images whose result came from the cache (or from an image with the same content)
    seconds: float = 0.0  # loading the model and running it; 0 when everything came from the cache

    @property
    def images_per_second(self) -> float | None:
        return self.computed / self.seconds if self.computed and self.seconds > 0 else None


def run_with_cache(
    method: str,
    images: dict[str, Path],
    cache: Cache,
    open_model: Callable[[], tuple[Callable[[list[Path]], list], int]],
    progress: Callable[[list, str], Iterable] = lambda batches, method: batches,
) -> MethodRun:
    """Results for each image (name → path): cached ones are read; the rest go through the model in batches.

    `open_model` is called only when some image is not cached, and returns the function that
    runs one batch of image paths and the batch size to run. Images with the same content run once.
    """
    run = MethodRun(method)
    pending: dict[str, list[str]] = {}  # image hash → names with that content
    for name, path in images.items():
        try:
            digest = hash_file(path)
        except OSError as exc:
            raise InputError(f"caption.{method}: cannot read {path} ({exc}); rerun preprocess") from None
        cached = cache.load(digest)
        if cached is None:
            pending.setdefault(digest, []).append(name)
        else:
            run.results[name] = cached
            run.reused += 1
    if not pending:
        return run
    start = time.perf_counter()
    compute, batch_size = open_model()
    digests = list(pending)
    for batch in progress([digests[i : i + batch_size] for i in range(0, len(digests), batch_size)], method):
        for digest, output in zip(batch, compute([images[pending[digest][0]] for digest in batch])):
            cache.save(digest, output)
            run.computed += 1
            run.reused += len(pending[digest]) - 1
            for name in pending[digest]:
                run.results[name] = output
    run.seconds = time.perf_counter() - start
    return run

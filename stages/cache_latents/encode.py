"""The cache_latents stage's work: encode what the store lacks, then write the manifest training reads.

Each store entry holds the latent distribution's `mean` and `logvar` (unscaled VAE output), so
training can reproduce AUTOMATIC1111's `once`, `deterministic` and `random` latent sampling.
The dataset streams through: images are read one batch at a time and each entry is written as
soon as its batch is encoded, so memory does not grow with the number of images.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd
import torch

from stages.cache_latents.encoder import LatentEncoder
from stages.cache_latents.pixels import image_to_tensor, read_image_size
from stages.cache_latents.settings import CacheSettings
from stages.cache_latents.store import EntryKey, LatentStore
from stages.common.files import hash_file, write_csv_atomic, write_text_atomic
from stages.common.errors import InputError, MissingInput
from stages.common.size_condition import SizeCondition, size_condition_of_row

__all__ = ["CacheSummary", "NonFiniteLatentsError", "Sample", "cache_latents", "image_to_tensor", "plan_samples"]

log = logging.getLogger(__name__)

# original_height..crop_left are SDXL's size conditioning (target size = height, width); empty when the
# preprocess manifest predates its crop_box/bucket columns
MANIFEST_COLUMNS = ["image", "flip", "latent_file", "width", "height", "latent_width", "latent_height", "image_sha256",
                    "original_height", "original_width", "crop_top", "crop_left"]
Progress = Callable[[Iterable, int], Iterable]


class NonFiniteLatentsError(InputError):
    """The VAE gave NaN/inf latents for some images even in fp32; those were not cached."""


@dataclass(frozen=True)
class Sample:
    """One manifest row: a preprocessed image (or its mirrored copy) and the store entry it uses."""

    image: str  # file name in the preprocess folder
    path: Path
    key: EntryKey
    size_condition: SizeCondition | None = None  # SDXL's add_time_ids; None when the preprocess manifest lacks the columns


@dataclass
class CacheSummary:
    images: int  # manifest rows: images times flips
    encoded: int  # entries written in this run
    reused: int  # rows whose entry was already in the store
    retried_fp32: int = 0  # entries that overflowed in fp16/bf16 and were encoded again in fp32
    seconds: float = 0.0  # wall time of the encoding loop (reading, encoding, writing)
    pruned_files: int = 0
    pruned_bytes: int = 0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rate = f" in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s)" if self.encoded else ""
        retried = f", {self.retried_fp32} retried in fp32 after an overflow" if self.retried_fp32 else ""
        pruned = f", {self.pruned_files} unused entries pruned ({self.pruned_bytes / 1e6:.1f} MB)" if self.pruned_files else ""
        return f"{self.images} latents: {self.encoded} encoded{rate}, {self.reused} reused from the cache{retried}{pruned}"


def plan_samples(preprocess_dir: Path, vae_identity: str, flip: bool, dtype: str,
                 tiles: Callable[[int, int], bool] = lambda w, h: False, workers: int = 1) -> list[Sample]:
    """One Sample per manifest image (two with flips), keyed by the PNG's content hash and real size."""
    manifest_path = preprocess_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise MissingInput(f"{manifest_path} not found; run the preprocess stage first")
    manifest = pd.read_csv(manifest_path, keep_default_na=False, dtype=str)
    if "output" not in manifest.columns:
        raise InputError(f"{manifest_path}: no 'output' column (found {', '.join(manifest.columns)}); rerun the preprocess stage")
    if manifest.empty:
        raise InputError(f"{manifest_path} lists no images; nothing to encode (see skipped.csv beside it)")
    paths = [preprocess_dir / name for name in manifest["output"]]

    def describe(path: Path) -> tuple[tuple[int, int], str]:
        size = read_image_size(path)  # first: a missing or broken file gets its clear error here
        return size, hash_file(path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashing releases the GIL
        facts = list(pool.map(describe, paths))
    samples = []
    for row, path, ((width, height), digest) in zip(manifest.to_dict("records"), paths, facts):
        for flipped in ([False, True] if flip else [False]):
            key = EntryKey(digest, vae_identity, width, height, flipped, dtype, tiles(width, height))
            samples.append(Sample(row["output"], path, key, _size_condition(row, flipped, manifest_path)))
    return samples


def _size_condition(row: dict, flipped: bool, manifest_path: Path) -> SizeCondition | None:
    try:
        return size_condition_of_row(row, flipped)
    except ValueError as error:
        raise InputError(f"{manifest_path}, the row of {row['output']}: {error}; rerun the preprocess stage to rewrite it") from None


def cache_latents(
    preprocess_dir: Path,
    out_dir: Path,
    store_dir: Path,
    vae: torch.nn.Module,
    vae_identity: str,
    *,
    settings: CacheSettings,
    flip: bool = False,
    progress: Progress | None = None,
) -> CacheSummary:
    """Encode what the store lacks and write out_dir/manifest.csv listing exactly the current images.

    `progress(samples, total)` wraps the images being encoded (a tqdm bar at the CLI). Raises
    NonFiniteLatentsError naming the images whose latents stayed NaN/inf; the manifest is then not
    written, and a rerun encodes only those images.
    """
    manifest_path = Path(out_dir) / "manifest.csv"
    manifest_path.unlink(missing_ok=True)  # a failed run must not leave a stale list for training
    device = settings.resolve_device()
    dtype = settings.resolve_dtype(device)
    encoder = LatentEncoder(vae, device, dtype, settings.tiling, settings.slicing)
    store = LatentStore(store_dir)
    samples = plan_samples(Path(preprocess_dir), vae_identity, flip, dtype, encoder.tiles, workers=torch.get_num_threads())

    missing = _missing_entries(samples, store)
    reused = sum(sample.key not in missing for sample in samples)
    log.info("%d latents: %d in the store, %d to encode on %s in %s, batches of %d",
             len(samples), reused, len(missing), device, dtype, settings.resolve_batch_size(device))
    if missing:
        _describe_vae_folder(store_dir / vae_identity, vae)

    started = time.perf_counter()
    retried, failed = 0, []
    batch_size = settings.resolve_batch_size(device)
    for batch in _size_batches(sorted(missing.values(), key=_size_of), batch_size, progress):
        pixels = torch.stack([image_to_tensor(sample.path, sample.key.flip) for sample in batch])
        result = encoder.encode(pixels)
        for index, sample in enumerate(batch):
            if index in result.failed:
                failed.append(sample)
                continue
            encoded_dtype = "fp32" if index in result.retried else dtype
            store.write(sample.key, result.mean[index].clone(), result.logvar[index].clone(), encoded_dtype)
        retried += len(result.retried)
    seconds = time.perf_counter() - started
    if failed:
        names = ", ".join(f"{s.image}{' (mirrored)' if s.key.flip else ''}" for s in failed)
        raise NonFiniteLatentsError(
            f"the VAE gave NaN/inf latents for {len(failed)} image(s) even in fp32, so they were not cached: {names}. "
            f"Check these images in {preprocess_dir} and the model's VAE; the other latents are cached, and a rerun encodes only these"
        )

    write_csv_atomic(manifest_path, _manifest_table(samples, store, Path(out_dir)))
    summary = CacheSummary(len(samples), len(missing), reused, retried, seconds)
    if settings.prune:
        summary.pruned_files, summary.pruned_bytes = store.prune({store.path(s.key) for s in samples})
    return summary


def _missing_entries(samples: list[Sample], store: LatentStore) -> dict[EntryKey, Sample]:
    """The store entries the samples need and the store lacks; identical images share one entry, encoded once."""
    missing: dict[EntryKey, Sample] = {}
    for sample in samples:
        if sample.key not in missing and not store.holds(sample.key):
            missing[sample.key] = sample
    return missing


def _size_of(sample: Sample) -> tuple[int, int]:
    return sample.key.height, sample.key.width


def _size_batches(samples: list[Sample], batch_size: int, progress: Progress | None) -> Iterator[list[Sample]]:
    """Batches of at most `batch_size` same-sized samples (buckets give several sizes), pulled lazily."""
    stream = progress(samples, len(samples)) if progress and samples else samples  # no empty bar when all is cached
    for _, same_size in itertools.groupby(stream, key=_size_of):
        while batch := list(itertools.islice(same_size, batch_size)):
            yield batch


def _manifest_table(samples: list[Sample], store: LatentStore, out_dir: Path) -> pd.DataFrame:
    rows = [{
        "image": s.image, "flip": s.key.flip, "latent_file": os.path.relpath(store.path(s.key), out_dir),
        "width": s.key.width, "height": s.key.height, "latent_width": s.key.width // 8,
        "latent_height": s.key.height // 8, "image_sha256": s.key.image_sha256,
        **_condition_cells(s.size_condition),
    } for s in samples]
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _condition_cells(condition: SizeCondition | None) -> dict[str, int | str]:
    names = ("original_height", "original_width", "crop_top", "crop_left")
    # "" rather than None: a None would turn the column into floats ("16.0") in the CSV
    return dict(zip(names, condition[:4] if condition is not None else ("",) * 4))


def _describe_vae_folder(folder: Path, vae: torch.nn.Module) -> None:
    """vae.json beside the entries: which VAE architecture the folder's latents came from."""
    about = folder / "vae.json"
    if about.exists():
        return
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not k.startswith("_")}
    write_text_atomic(about, json.dumps({"class": type(vae).__name__, "config": config}, indent=2, default=str) + "\n")

"""Preprocess throughput: images/s for 200 generated 3000×2000 photos in center and focal modes.

    python bench/bench_preprocess.py                  # 200 photos, 2 workers, 512x512 frames
    python bench/bench_preprocess.py --count 50 --keep /tmp/photos   # smaller, and keep the photos

The photos are JPEGs made here (smooth colour fields, shapes and sensor-like noise, so they
decode and compress like camera pictures). Each mode runs with an empty cache, once on one
worker (the baseline) and once on --workers; then one photo is added and the run repeated,
to show the incremental rule: only that photo is processed.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder  # noqa: E402


@functools.lru_cache(maxsize=1)
def _grain(size: tuple[int, int]) -> Image.Image:
    # colour sensor noise: makes the JPEGs as large as a camera's (~2 MB at 6 MP); slow to make, so one per process
    return Image.merge("RGB", [Image.effect_noise(size, 40) for _ in range(3)])


def make_photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """A camera-like JPEG: blurry colour field, a few sharp shapes, grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, size=(size[1] // 250, size[0] // 250, 3), dtype=np.uint8))
    image = field.resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        w, h = int(rng.integers(50, size[0] // 4)), int(rng.integers(50, size[1] // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
    Image.blend(image, _grain(size), 0.25).save(path, quality=90)


def make_photos(folder: Path, count: int, size: tuple[int, int], workers: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{index:04d}.jpg" for index in range(count)]
    missing = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(make_photo, [p for p, _ in missing], [size] * len(missing), [i for _, i in missing]))
    return paths


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker pool is joined at the end of a run)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_run(source: Path, work: Path, settings: PreprocessSettings, workers: int, fresh: bool) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, summary) of one preprocess run."""
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    summary = preprocess_folder(source, work / "preprocess", settings, cache_dir=work / "cache", workers=workers)
    return time.perf_counter() - start, _cpu_seconds() - cpu, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--photo-size", default="3000x2000", help="WxH of the generated photos")
    parser.add_argument("--frame", type=int, default=512, help="preprocess.size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["center", "focal"])
    parser.add_argument("--keep", type=Path, help="generate the photos here and keep them (reused when present)")
    args = parser.parse_args()
    photo_size = tuple(int(v) for v in args.photo_size.split("x"))
    scratch = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    source = args.keep or scratch / "photos"
    try:
        start = time.perf_counter()
        make_photos(source, args.count, photo_size, args.workers)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
              f"{len(os.sched_getaffinity(0))} usable; Python {platform.python_version()}, Pillow {Image.__version__}")
        print(f"{args.count} photos {args.photo_size} JPEG ready in {time.perf_counter() - start:.1f}s; frame {args.frame}x{args.frame}\n")
        # CPU ms per image does not depend on what else the machine runs; images/s does
        print(f"{'mode':8} {'workers':>8} {'seconds':>8} {'images/s':>9} {'speedup':>8} {'CPU ms/img':>11}")
        for mode in args.modes:
            settings = PreprocessSettings.from_schema(size=(args.frame, args.frame), mode=mode)
            base_s, base_cpu, _ = timed_run(source, scratch / mode, settings, 1, fresh=True)
            par_s, par_cpu, summary = timed_run(source, scratch / mode, settings, args.workers, fresh=True)
            assert summary.processed == args.count, summary
            for workers, wall, cpu in ((1, base_s, base_cpu), (args.workers, par_s, par_cpu)):
                print(f"{mode:8} {workers:>8} {wall:>8.1f} {args.count / wall:>9.1f} {base_s / wall:>8.2f} {1000 * cpu / args.count:>11.0f}")
            extra = source / "zz_added.jpg"
            make_photo(extra, photo_size, seed=10_000)
            try:
                again_s, _, again = timed_run(source, scratch / mode, settings, args.workers, fresh=False)
            finally:
                extra.unlink()
            print(f"{mode:8} {'+1 photo':>8} {again_s:>8.1f}  processed {again.processed}, reused {again.reused}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

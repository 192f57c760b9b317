"""Snakemake at 100, 1,000 and 10,000 images: DAG building, a rerun with nothing to do, and adding one image.

    python bench/bench_workflow.py                      # 100, 1,000 and 10,000 generated 96×96 photos
    python bench/bench_workflow.py --counts 100 1000

For each count, in a fresh folder: the whole workflow runs once (64×64 frames, a 2-step run);
then `snakemake -n` (DAG building and planning) and a plain `snakemake` with nothing to do are
timed, each the median of 3; then one image is added and the rerun's preprocess and
cache_latents logs say how many images were processed and how many came from their caches.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scale import make_photos  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def snakemake(work: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work), "--cores", "2", *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return time.perf_counter() - started, result


def median_time(work: Path, *args: str, repeat: int = 3) -> float:
    return statistics.median(snakemake(work, *args)[0] for _ in range(repeat))


def measure(count: int, root: Path) -> dict:
    work = root / f"n{count}"
    make_photos(work / "photos", count)
    config = {"out_dir": "out", "dataset": {"images": str(work / "photos")}, "preprocess": {"size": 64},
              "train": {"steps": 2, "save_every": 0}, "runs": {"benchtok": {}},
              "evaluate": {"seeds": [1], "steps": 2, "validation_samples": 2, "checkpoint_grid": 0}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    first, _ = snakemake(work)
    result = {"count": count, "first_run_s": first, "dry_run_s": median_time(work, "-n"), "noop_rerun_s": median_time(work)}
    make_photos(work / "extra", 1, seed=count + 1)
    (work / "extra" / "photo_00000.png").rename(work / "photos" / "added.png")
    (work / "extra" / "photo_00000.txt").rename(work / "photos" / "added.txt")
    result["add_one_s"], _ = snakemake(work)
    preprocess_log = (work / "out/logs/preprocess.log").read_text()
    latents_log = (work / "out/logs/cache_latents.log").read_text()
    result["preprocess"] = re.findall(r"\((\d+) processed, (\d+) from cache\)", preprocess_log)[-1]
    result["cache_latents"] = re.findall(r"(\d+) encoded.*?(\d+) reused", latents_log)[-1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/tiflow-bench-workflow"))
    args = parser.parse_args()
    print(f"{'images':>7} {'first run s':>12} {'snakemake -n s':>15} {'no-op rerun s':>14} {'add one image s':>16}  preprocess (processed, cached)  cache_latents (encoded, reused)")
    for count in args.counts:
        r = measure(count, args.root)
        print(f"{r['count']:>7} {r['first_run_s']:>12.1f} {r['dry_run_s']:>15.2f} {r['noop_rerun_s']:>14.2f} {r['add_one_s']:>16.1f}  "
              f"{r['preprocess']}  {r['cache_latents']}", flush=True)


if __name__ == "__main__":
    main()

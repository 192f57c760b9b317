"""Peak memory of each data stage at 1,000 and 10,000 images: does it stay bounded as the dataset grows?

    python bench/bench_scale.py                         # 1,000 and 10,000 generated 96×96 photos, 64×64 frames
    python bench/bench_scale.py --counts 500 5000 --threads 2

Each stage runs in its own process on the previous stage's output, as Snakemake runs them:
preprocess (center crop, 2 workers), caption (sidecar captions), cache_latents (tiny-sd15 VAE)
and the training data loader (`load_examples`, which reads every cached latent). A process's
peak RSS is its VmHWM; the preprocess workers' peak is reported beside it. The last column is
the 10,000-image peak divided by the 1,000-image peak: 1.0 means memory does not grow with the
dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("preprocess", "caption", "cache_latents", "train_loader")


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmHWM")


def make_photos(folder: Path, count: int, side: int = 96, seed: int = 0) -> None:
    """`count` distinct smooth-noise PNGs with a caption sidecar each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(folder / f"photo_{index:05d}.png", compress_level=1)
        (folder / f"photo_{index:05d}.txt").write_text(f"a red toy, picture {index}", encoding="utf-8")


def run_stage(stage: str, work: Path, threads: int) -> dict:
    """In this process: one stage on work/, returning its figures."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    if stage == "preprocess":
        from stages.preprocess.prepare import PreprocessSettings, preprocess_folder

        preprocess_folder(work / "photos", work / "preprocess", PreprocessSettings.from_schema(size=(64, 64)), work / "cache" / "preprocess",
                                    workers=threads)
        items = None
    elif stage == "caption":
        from stages.caption.captions import write_captions

        write_captions(work / "preprocess", work / "caption", "existing")
        items = None
    elif stage == "cache_latents":
        from stages.cache_latents.encode import cache_latents
        from stages.cache_latents.settings import CacheSettings
        from stages.common.models import load_model

        bundle = load_model("builtin:tiny-sd15")
        summary = cache_latents(work / "preprocess", work / "latents", work / "cache" / "latents", bundle.vae, bundle.identity,
                                settings=CacheSettings.from_schema(device="cpu"))
        items = summary.encoded
    else:
        from stages.common.latents import load_examples

        items = len(load_examples(work / "latents", work / "caption"))
    return {"stage": stage, "seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(),
            "workers_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "items": items}


def measure(count: int, threads: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench_scale_{count}_") as folder:
        work = Path(folder)
        make_photos(work / "photos", count)
        results = {}
        for stage in STAGES:
            command = [sys.executable, __file__, "--child", stage, "--work", str(work), "--threads", str(threads)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[stage] = json.loads(output.strip().splitlines()[-1])
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child, args.work, args.threads)))
        return
    print(f"{os.cpu_count()} CPUs visible, {args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    small, large = (measure(count, args.threads) for count in args.counts)
    print(f"{'stage':<15}{'peak MiB ' + str(args.counts[0]):>16}{'peak MiB ' + str(args.counts[1]):>17}{'ratio':>8}"
          f"{'workers MiB':>13}{'s ' + str(args.counts[1]):>10}")
    for stage in STAGES:
        a, b = small[stage], large[stage]
        print(f"{stage:<15}{a['peak_mib']:>16.0f}{b['peak_mib']:>17.0f}{b['peak_mib'] / a['peak_mib']:>8.2f}"
              f"{b['workers_peak_mib']:>13.0f}{b['seconds']:>10.1f}")


if __name__ == "__main__":
    main()

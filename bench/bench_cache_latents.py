"""cache_latents: images/s per VAE at 512×512, and peak memory (RSS) while caching 2,000 images.

    python bench/bench_cache_latents.py                               # 2 threads, tiny-sd15 and small-sd15, 2,000 images
    python bench/bench_cache_latents.py --models sd15 --device cuda --dtypes fp32,fp16 --images 64 --batch-sizes 4,8 --memory-images 0

Throughput: --images generated 512×512 PNGs go through the real stage (`cache_latents`: hashing,
PNG decoding, VAE encoding, one safetensors file per image) with an empty store, after one
warm-up call, for each batch size. The baseline, in the same process, is a plain `vae.encode`
(NCHW, as diffusers runs it) on the same batches already in memory: stage / plain shows what
the stage adds around the VAE (files) and gains (channels-last layout).

Memory: a child process caches N generated 64×64 images with the tiny VAE and reports its peak
RSS and its RSS at 10%, 50% and 100% of the images. It runs for --memory-baseline images and for
--memory-images, so the ratio of the peaks shows whether memory grows with the dataset.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.cache_latents.encode import cache_latents  # noqa: E402
from stages.cache_latents.encoder import DTYPES  # noqa: E402
from stages.cache_latents.pixels import image_to_tensor  # noqa: E402
from stages.cache_latents.settings import CacheSettings  # noqa: E402
from stages.common.builtin import BUILTIN_MODELS  # noqa: E402


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` distinct smooth-noise PNGs plus a preprocess-style manifest.csv; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        coarse = rng.integers(0, 256, (max(1, size // 16), max(1, size // 16), 3), dtype=np.uint8)
        name = f"img_{index:05d}.png"
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / name, compress_level=1)
        names.append(name)
    pd.DataFrame({"output": names, "out_width": size, "out_height": size}).to_csv(folder / "manifest.csv", index=False)
    return folder


def load_vae(model: str) -> torch.nn.Module:
    """Only the VAE of a builtin model, random weights (speed does not depend on them; the UNet is not needed)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**BUILTIN_MODELS[model].vae).eval().requires_grad_(False)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: that one carries the parent's peak across fork and exec
    return _status_mib("VmHWM")


def plain_rate(vae, images: Path, device: torch.device, dtype: str, batches: list[list[str]]) -> float:
    """Images/s of a plain `vae.encode` (NCHW, no store, pixels already in memory) on the same batches: the baseline."""
    plain = torch.nn.Module.to(copy.deepcopy(vae), device=device, dtype=DTYPES[dtype])
    tensors = [torch.stack([image_to_tensor(images / name, False) for name in batch]).to(device, DTYPES[dtype]) for batch in batches]
    with torch.no_grad():
        plain.encode(tensors[0])  # first-call costs, as the stage's warm-up
        _sync(device)
        start = time.perf_counter()
        for pixels in tensors:
            plain.encode(pixels).latent_dist.mean.cpu()
        _sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(vae, model: str, dtype: str, batch_size: int, args: argparse.Namespace, work: Path) -> dict:
    images = work / "images512"
    if not (images / "manifest.csv").exists():
        make_images(images, args.images, args.size)
    settings = CacheSettings.from_schema(batch_size=batch_size, dtype=dtype, device=args.device)
    device = settings.resolve_device()
    batch = settings.resolve_batch_size(device)
    name = f"{model}_{dtype}_{batch}"
    warm = make_images(work / f"warm_{batch}", batch, args.size, seed=99)
    cache_latents(warm, work / "warm_out", work / f"warm_store_{name}", vae, model, settings=settings)  # first-call costs
    store = work / f"store_{name}"
    summary = cache_latents(images, work / "out", store, vae, model, settings=settings)
    names = list(pd.read_csv(images / "manifest.csv").output)
    plain = plain_rate(vae, images, device, settings.resolve_dtype(device), [names[i:i + batch] for i in range(0, len(names), batch)])
    again = cache_latents(images, work / "out", store, vae, model, settings=settings)
    return {"batch": batch, "stage": summary.images_per_second, "plain": plain, "retried": summary.retried_fp32,
            "cached_run": again.reused, "error": difference_from_fp32(work / f"store_{model}_fp32_{batch}", store, dtype)}


def difference_from_fp32(reference: Path, store: Path, dtype: str) -> float | None:
    """Largest |mean - fp32 mean| over the images, when an fp32 run of the same VAE came first."""
    if dtype == "fp32" or not reference.is_dir():
        return None
    worst = 0.0
    for entry in reference.rglob("*-fp32.safetensors"):
        other = store / entry.parent.name / entry.name.replace("-fp32", f"-{dtype}")
        worst = max(worst, (load_file(str(entry))["mean"] - load_file(str(other))["mean"]).abs().max().item())
    return worst


def memory_child(count: int, work: Path, threads: int) -> None:
    """Runs in its own process: cache `count` 64×64 images with the tiny VAE; print RSS figures as JSON."""
    torch.set_num_threads(threads)
    images = make_images(work / "images64", count, 64)
    vae = load_vae("tiny-sd15")
    before = rss_mib()
    marks = {max(1, count // 10): "rss_10", max(1, count // 2): "rss_50", count: "rss_100"}
    seen: dict[str, float] = {}

    def progress(samples, total):
        for done, sample in enumerate(samples, start=1):
            yield sample
            if done in marks:
                seen[marks[done]] = rss_mib()

    summary = cache_latents(images, work / "out", work / "store", vae, "tiny", settings=CacheSettings.from_schema(device="cpu"), progress=progress)
    print(json.dumps({"count": count, "rss_before": before, **seen, "peak": peak_rss_mib(), "rate": summary.images_per_second}))


def memory(count: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_cache_mem_") as work:
        command = [sys.executable, __file__, "--memory-child", str(count), "--work", work, "--threads", str(threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the cores the stage is given)")
    parser.add_argument("--models", default="tiny-sd15,small-sd15", help="builtin models whose VAE to time ('' = memory run only)")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated cache_latents.dtype values to time")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=8, help="images per throughput run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,4", help="cache_latents.batch_size values to time (0 = the stage's auto)")
    parser.add_argument("--memory-images", type=int, default=2000, help="images in the memory run (0 = skip)")
    parser.add_argument("--memory-baseline", type=int, default=200)
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.work, args.threads)
        return
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
          f"{args.threads} threads{', ' + gpu if gpu else ''}; load average {os.getloadavg()[0]:.1f}")
    print(f"\nthroughput: {args.images} images of {args.size}x{args.size}, {args.device}; baseline: plain vae.encode (NCHW) on the same batches")
    print(f"{'VAE':<12}{'params':>8}{'dtype':>7}{'batch':>7}{'stage img/s':>13}{'plain img/s':>13}{'stage/plain':>13}{'rerun':>14}{'max|mean-fp32|':>16}")
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as work:
        for model in filter(None, args.models.split(",")):
            vae = load_vae(model)
            params = sum(p.numel() for p in vae.parameters()) / 1e6
            for dtype in args.dtypes.split(","):
                for batch_size in map(int, args.batch_sizes.split(",")):
                    row = throughput(vae, model, dtype, batch_size, args, Path(work))
                    error = "" if row["error"] is None else format(row["error"], "16.4f")
                    retried = f"  ({row['retried']} fp32 retries)" if row["retried"] else ""
                    print(f"{model:<12}{params:>7.1f}M{dtype:>7}{row['batch']:>7}{row['stage']:>13.2f}{row['plain']:>13.2f}"
                          f"{row['stage'] / row['plain']:>13.2f}{row['cached_run']:>8} reused{error}{retried}")
    if args.memory_images:
        print(f"\nmemory: 64x64 images, tiny-sd15 VAE, default settings (batch 1 on the CPU), {args.threads} threads, each count in a fresh process")
        print(f"{'images':>7}{'RSS before':>12}{'at 10%':>9}{'at 50%':>9}{'at 100%':>9}{'peak':>9}{'img/s':>8}  (MiB)")
        rows = [memory(count, args.threads) for count in (args.memory_baseline, args.memory_images)]
        for r in rows:
            print(f"{r['count']:>7}{r['rss_before']:>12.0f}{r['rss_10']:>9.0f}{r['rss_50']:>9.0f}{r['rss_100']:>9.0f}{r['peak']:>9.0f}{r['rate']:>8.1f}")
        print(f"peak RSS {rows[1]['count']} / {rows[0]['count']} images: {rows[1]['peak'] / rows[0]['peak']:.3f}; "
              f"growth from 10% to 100% of {rows[1]['count']}: {rows[1]['rss_100'] - rows[1]['rss_10']:+.0f} MiB")


if __name__ == "__main__":
    main()

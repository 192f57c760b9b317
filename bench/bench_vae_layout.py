"""The VAE encoder alone in NCHW against channels-last, alternating in one process.

    python bench/bench_vae_layout.py --model sd15 --size 512 --repeats 3

cache_latents runs its VAE copy channels-last; this checks that the layout helps for a given
VAE size (the stage benchmark's few images at full size are too noisy to tell).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages.common.builtin import BUILTIN_MODELS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    nchw = AutoencoderKL(**BUILTIN_MODELS[args.model].vae).eval().requires_grad_(False)
    channels_last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    layouts = {"nchw": (nchw, pixels), "channels_last": (channels_last, pixels.to(memory_format=torch.channels_last))}
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    with torch.no_grad():
        for vae, inputs in layouts.values():  # warm-up
            vae.encode(inputs)
        for _ in range(args.repeats):
            for name, (vae, inputs) in layouts.items():
                started = time.perf_counter()
                vae.encode(inputs)
                seconds[name].append(time.perf_counter() - started)
    for name, times in seconds.items():
        print(f"{name:<14} " + "  ".join(f"{t:.2f} s" for t in times) + f"   median {sorted(times)[len(times) // 2]:.2f} s")
    ratio = sorted(seconds["nchw"])[args.repeats // 2] / sorted(seconds["channels_last"])[args.repeats // 2]
    print(f"{args.model} VAE, {args.batch}x{args.size}x{args.size}: channels-last is {ratio:.2f}x the speed of NCHW")


if __name__ == "__main__":
    main()

"""The cost of an APT step (DreamArtist: positive and negative prompt in one doubled UNet pass) against a plain TI step.

The two trainers alternate step by step in one process, each on its own copy of the same builtin
model, so background load hits both alike. Usage:
    python bench/bench_apt.py [--models tiny-sd15 small-sd15] [--size 256] [--steps 12] [--reconstruction]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train import _examples  # noqa: E402


def _trainer(model: str, size: int, batch: int, steps: int, apt: dict | None):
    from stages.common.models import load_model
    from stages.train.outputs import RunOutputs
    from stages.train.resume import ResumeStore
    from stages.train.settings import TrainSettings
    from stages.train.trainer import Trainer

    settings = TrainSettings.from_schema(name="benchtok", token="benchtok", init_text="toy", vectors=4, steps=steps, batch_size=batch,
                                         save_every=0, learning_rate=3e-3, apt=apt)
    return Trainer(load_model(f"builtin:{model}"), _examples(16, size // 8), settings, RunOutputs(Path(tempfile.mkdtemp()), "benchtok"),
                   ResumeStore(None))


def measure(model: str, size: int, batch: int, warmup: int, steps: int, apt: dict) -> dict:
    plain, contrastive = _trainer(model, size, batch, warmup + steps, None), _trainer(model, size, batch, warmup + steps, apt)
    times = {"plain": [], "apt": []}
    for step in range(warmup + steps):
        for name, trainer in (("plain", plain), ("apt", contrastive)):
            started = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-sd15", "small-sd15"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reconstruction", action="store_true", help="also time APT with DreamArtist's reconstruction loss")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, batch {args.batch}, median of {args.steps} steps")
    variants = [("apt", {"vectors_neg": 6, "cfg_scale": 3.0, "ema": 0.97})]
    if args.reconstruction:
        variants.append(("apt + reconstruction", {"vectors_neg": 6, "cfg_scale": 3.0, "ema": 0.97, "reconstruction": True}))
    for model in args.models:
        for label, apt in variants:
            timed = measure(model, args.size, args.batch, args.warmup, args.steps, apt)
            print(f"{model:<12} plain TI {timed['plain']:.4f} s/step, {label} {timed['apt']:.4f} s/step: {timed['apt'] / timed['plain']:.3f}x")


if __name__ == "__main__":
    main()

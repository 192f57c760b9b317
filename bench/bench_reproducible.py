"""What bit-identical CPU runs cost: tiflow's train step with MKL_CBWR=AUTO (tiflow's default) against MKL's own default.

Each setting runs in its own process (MKL reads the setting once), alternating, `--rounds` times;
the table gives the median step time of each and the ratio, plus whether every run of 60 tiny-sd15
steps at 64x64 gave the same vectors. Usage:
    python bench/bench_reproducible.py [--model small-sd15] [--size 256] [--steps 10] [--rounds 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(args: argparse.Namespace) -> None:
    import stages  # noqa: F401  (sets MKL_CBWR=AUTO unless told otherwise)

    if args.mkl == "default":
        os.environ.pop("MKL_CBWR", None)  # before MKL's first call, so MKL keeps its own default
    from bench.bench_train import _trainer, measure_tiflow

    timing = measure_tiflow(args.model, args.size, 1, 3, args.steps)
    trainer = _trainer("tiny-sd15", 64, 1, 0, 60)  # where run-to-run differences were first seen (issue 12)
    trainer.run()
    digest = hashlib.sha256(trainer.model.vectors["emb_params"].detach().numpy().tobytes()).hexdigest()[:16]
    print(json.dumps({"seconds_per_step": timing["seconds_per_step"], "vectors": digest}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mkl", choices=["auto", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mkl:
        child(args)
        return
    results: dict[str, list[dict]] = {"auto": [], "default": []}
    for _ in range(args.rounds):
        for mkl in ("default", "auto"):
            output = subprocess.run([sys.executable, __file__, "--mkl", mkl, "--model", args.model, "--size", str(args.size),
                                     "--steps", str(args.steps)], capture_output=True, text=True, check=True).stdout
            results[mkl].append(json.loads(output.strip().splitlines()[-1]))
    median = lambda rows: sorted(r["seconds_per_step"] for r in rows)[len(rows) // 2]
    print(f"{args.model}, {args.size}x{args.size}, batch 1, {args.rounds} processes each, median of {args.steps} steps")
    print(f"{'MKL_CBWR':<10} {'s/step':>8} {'identical vectors over runs':>28}")
    for mkl in ("default", "auto"):
        same = len({r["vectors"] for r in results[mkl]}) == 1
        print(f"{mkl:<10} {median(results[mkl]):>8.4f} {str(same):>28}")
    print(f"ratio auto/default: {median(results['auto']) / median(results['default']):.3f}")


if __name__ == "__main__":
    main()

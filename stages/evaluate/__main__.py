"""python -m stages.evaluate: grids, validation loss per checkpoint, the best checkpoint and a report page (see --help)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from stages.common.config import run_settings, validate_config
from stages.common.stage_cli import add_settings_arguments, load_full_config, run_stage
from stages.common.text import plural
from stages.common.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.evaluate",
        description="Score every saved checkpoint of a run on fixed noise (val_loss.csv), copy the best one to best/, "
                    "and render grid.png, checkpoints.png, loss.png, metrics.json and index.html.",
    )
    add_settings_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="the run (embedding name) to evaluate")
    what.add_argument("--overview", action="store_true",
                      help="instead: write index.html comparing runs already evaluated, in --out (default: {out_dir}/evaluate)")
    parser.add_argument("--runs", nargs="+", help="with --overview: the runs to compare (default: every run in config.yaml)")
    parser.add_argument("--train-dir", type=Path, help="the run's train folder (default: {out_dir}/train/{run})")
    parser.add_argument("--latents", type=Path, help="the cache_latents folder (default: {out_dir}/latents)")
    parser.add_argument("--captions", type=Path, help="the caption folder (default: {out_dir}/caption)")
    parser.add_argument("--out", type=Path, help="output folder (default: {out_dir}/evaluate/{run})")
    return parser


def _size(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def main(args: argparse.Namespace) -> int:
    if args.overview:
        return overview(args)
    from stages.evaluate.report import RunToEvaluate

    if args.settings is not None:
        # Snakemake passes {"evaluate": ..., "model": ..., "size": ..., "run": {the run's EVALUATE_RUN_KEYS}}
        given = json.loads(args.settings)
        config = validate_config({k: given[k] for k in ("evaluate", "model") if k in given}, source="--settings")
        missing = [flag for flag, value in (("--train-dir", args.train_dir), ("--latents", args.latents),
                                            ("--captions", args.captions), ("--out", args.out)) if value is None]
        if missing:
            raise InputError(f"--settings needs {', '.join(missing)} too")
        size, out = _size(given.get("size", 512)), args.out
        run = RunToEvaluate.from_run_settings(args.run, given.get("run", {}), args.train_dir, args.latents, args.captions)
    else:
        config = load_full_config(args)
        root = Path(config["out_dir"])
        size, out = _size(config["preprocess"]["size"]), args.out or root / "evaluate" / args.run
        run = RunToEvaluate.from_run_settings(args.run, run_settings(config, args.run), args.train_dir or root / "train" / args.run,
                                              args.latents or root / "latents", args.captions or root / "caption")
    from stages.common.models import load_model
    from stages.evaluate.report import evaluate_run

    model = config["model"]
    bundle = load_model(model["path"], model["family"])
    metrics = evaluate_run(bundle, run, config["evaluate"], size, out, clip_skip=model["clip_skip"],
                           progress=lambda items: tqdm(items, desc=f"evaluate {args.run}: validation loss", unit="checkpoint"))
    print(f"evaluate {args.run}: best step {metrics['best_step']} of {metrics['final_step']} "
          f"(validation loss {metrics['val_loss_start']} at the start → {metrics['val_loss_best']}); report: {out / 'index.html'}")
    if not metrics["beats_start"]:
        print(f"evaluate {args.run}: warning: no saved checkpoint beats the starting vectors; see the report", file=sys.stderr)
    return 0


def overview(args: argparse.Namespace) -> int:
    from stages.evaluate.overview import write_overview

    if args.runs and args.out:
        runs, folder = args.runs, args.out
    else:
        config = load_full_config(args)
        runs, folder = args.runs or list(config["runs"]), args.out or Path(config["out_dir"]) / "evaluate"
    print(f"evaluate: {plural(len(runs), 'run')} compared in {write_overview(folder, runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

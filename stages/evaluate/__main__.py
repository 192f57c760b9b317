"""python -m stages.evaluate: sample grids and a loss curve for a trained embedding (see --help)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.common.config import run_settings, validate_config
from stages.common.stage_cli import add_settings_arguments, load_full_config, run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description="Render grid.png (prompts × seeds) and loss.png for a trained run.")
    add_settings_arguments(parser)
    parser.add_argument("--run", required=True, help="the run (embedding name) to evaluate")
    parser.add_argument("--train-dir", type=Path, help="the run's train folder (default: {out_dir}/train/{run})")
    parser.add_argument("--out", type=Path, help="output folder (default: {out_dir}/evaluate/{run})")
    return parser


def _size(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def main(args: argparse.Namespace) -> int:
    if args.settings is not None:
        # Snakemake passes {"evaluate": ..., "model": ..., "size": ..., "token": ...}
        given = json.loads(args.settings)
        config = validate_config({k: given[k] for k in ("evaluate", "model") if k in given}, source="--settings")
        section, model = config["evaluate"], config["model"]
        size, trigger = _size(given.get("size", 512)), given.get("token", args.run)
        if not (args.train_dir and args.out):
            raise ValueError("--settings needs --train-dir and --out too")
        train_dir, out = args.train_dir, args.out
    else:
        config = load_full_config(args)
        section, model = config["evaluate"], config["model"]
        size, trigger = _size(config["preprocess"]["size"]), run_settings(config, args.run)["token"]
        root = Path(config["out_dir"])
        train_dir, out = args.train_dir or root / "train" / args.run, args.out or root / "evaluate" / args.run
    from stages.common.models import load_model
    from stages.evaluate.report import evaluate_run

    bundle = load_model(model["path"], model["family"])
    grid = evaluate_run(bundle, train_dir, args.run, trigger, section, size, out)
    print(f"evaluate: wrote {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

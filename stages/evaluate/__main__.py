"""python -m stages.evaluate: grids, validation loss per checkpoint, the best checkpoint and a report page (see --help)."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from stages.common.config import run_settings
from stages.common.layout import StageDirs, frame_size
from stages.common.stage_cli import read_settings, run_stage, stage_parser
from stages.common.workflow import STAGE_SECTIONS
from stages.common.text import plural


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("evaluate", "Score every saved checkpoint of a run on fixed noise (val_loss.csv), copy the best one to best/, "
                          "and render grid.png, checkpoints.png, loss.png, metrics.json and index.html.",
                          ("--train-dir", "--preprocessed", "--latents", "--captions"), {
                              "--out": "output folder (default: {out_dir}/evaluate/{run}, or {out_dir}/evaluate with --overview)"})
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="the run (embedding name) to evaluate")
    what.add_argument("--overview", action="store_true", help="instead: write index.html comparing runs already evaluated, in --out")
    parser.add_argument("--runs", nargs="+", help="with --overview: the runs to compare (default: every run in config.yaml)")
    parser.add_argument("--sweeps", help="with --overview: JSON {sweep: {run: grid point}} to rank each sweep's runs (default: config.yaml's sweeps)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.overview:
        return overview(args)
    from stages.evaluate.report import RunToEvaluate

    config = read_settings(args, STAGE_SECTIONS["evaluate"])
    dirs = StageDirs(config["out_dir"])
    size, out = frame_size(config["preprocess"]["size"]), args.out or dirs.evaluate(args.run)
    run = RunToEvaluate.from_run_settings(args.run, run_settings(config, args.run), args.train_dir or dirs.train(args.run),
                                          args.latents or dirs.latents, args.captions or dirs.caption, args.preprocessed or dirs.preprocess)
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

    import json

    from stages.common.config import sweep_points

    config = None if args.runs and args.out and args.sweeps is not None else read_settings(args, STAGE_SECTIONS["overview"])
    runs = args.runs or list(config["runs"])
    folder = args.out or StageDirs(config["out_dir"]).evaluate_root
    sweeps = json.loads(args.sweeps) if args.sweeps is not None else sweep_points(config.get("sweeps"))
    print(f"evaluate: {plural(len(runs), 'run')} compared in {write_overview(folder, runs, sweeps)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

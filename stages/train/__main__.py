"""python -m stages.train: train one run's embedding (see --help)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from stages.common.config import run_settings, validate_config
from stages.common.stage_cli import add_settings_arguments, load_full_config, run_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.train",
        description="Train a Textual Inversion embedding from cached latents and captions; write {run}.safetensors, {run}.pt, steps/ and loss.csv.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--run", required=True, help="the run (embedding name) in runs: to train")
    parser.add_argument("--latents", type=Path, help="the cache_latents folder (default: {out_dir}/latents)")
    parser.add_argument("--captions", type=Path, help="the caption folder (default: {out_dir}/caption)")
    parser.add_argument("--out", type=Path, help="output folder (default: {out_dir}/train/{run})")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.settings is not None:
        # Snakemake passes {"model": ..., "run": <train.* merged with runs.<run>>}
        section = json.loads(args.settings)
        config = validate_config({"model": section.get("model", {}), "train": section.get("run", {})}, source="--settings")
        settings, model = dict(config["train"], name=args.run), config["model"]
        settings.setdefault("token", args.run)
        if not (args.latents and args.captions and args.out):
            raise ValueError("--settings needs --latents, --captions and --out too")
        latents, captions, out = args.latents, args.captions, args.out
    else:
        config = load_full_config(args)
        settings, model = run_settings(config, args.run), config["model"]
        root = Path(config["out_dir"])
        latents, captions = args.latents or root / "latents", args.captions or root / "caption"
        out = args.out or root / "train" / args.run
    from stages.common.models import load_model
    from stages.train.dataset import load_examples
    from stages.train.trainer import TrainSettings, train_embedding

    train_settings = TrainSettings.from_section(settings, clip_skip=model["clip_skip"])
    bundle = load_model(model["path"], model["family"])
    examples = load_examples(latents, captions)
    result = train_embedding(bundle, examples, train_settings, out,
                             progress=lambda steps: tqdm(steps, desc=f"train {args.run}", unit="step"))
    print(f"train: {args.run} done after {len(result.losses)} steps; loss on fixed noise {result.probe_loss_start:.4f} → "
          f"{result.probe_loss_end:.4f}; wrote {out / (args.run + '.safetensors')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

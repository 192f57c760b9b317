"""python -m stages.caption: write one caption per preprocessed image (see --help)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.caption.captions import write_captions
from stages.common.stage_cli import add_settings_arguments, load_full_config, run_stage, section_from_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.caption", description="Write caption/{image}.txt and captions.csv for every preprocessed image.")
    add_settings_arguments(parser)
    parser.add_argument("--preprocessed", type=Path, help="the preprocess stage's folder (default: {out_dir}/preprocess)")
    parser.add_argument("--out", type=Path, help="output folder (default: {out_dir}/caption)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.settings is not None:
        section = section_from_json("caption", args.settings)
        if not (args.preprocessed and args.out):
            raise ValueError("--settings needs --preprocessed and --out too")
        preprocessed, out = args.preprocessed, args.out
    else:
        config = load_full_config(args)
        section = config["caption"]
        preprocessed = args.preprocessed or Path(config["out_dir"]) / "preprocess"
        out = args.out or Path(config["out_dir"]) / "caption"
    table = write_captions(preprocessed, out, section["method"])
    empty = int((table.caption == "").sum())
    print(f"caption: {len(table)} captions written to {out} ({empty} empty)")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

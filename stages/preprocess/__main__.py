"""python -m stages.preprocess: frame a folder of images for training (see --help)."""
from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from stages.common.layout import StageDirs
from stages.common.stage_cli import read_settings, run_stage, stage_parser
from stages.common.workflow import STAGE_SECTIONS
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder, resolve_source
from stages.common.errors import InputError


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS has no affinity


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("preprocess", "Normalise and frame every image of a folder (or builtin:demo); write PNGs, captions, "
                          "manifest.csv, skipped.csv and near_duplicates.csv. Framed images are cached by content and settings, "
                          "so a rerun only processes new or changed images.", (), {
                              "--out": "output folder (default: {out_dir}/preprocess)",
                              "--cache": "per-image cache that survives reruns (default: {out_dir}/cache/preprocess)"})
    parser.add_argument("--images", help="source folder or builtin:demo (default: dataset.images of the config)")
    parser.add_argument("--threads", type=int, default=_usable_cores(), help="worker processes (default: every core this process may use)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise InputError(f"--threads: {args.threads} is not a number of worker processes; give 1 or more")
    config = read_settings(args, STAGE_SECTIONS["preprocess"])
    section, dirs = config["preprocess"], StageDirs(config["out_dir"])
    images, out = args.images or config["dataset"]["images"], args.out or dirs.preprocess
    settings = PreprocessSettings.from_section(section)
    source = resolve_source(images, out.parent)
    summary = preprocess_folder(
        source, out, settings, cache_dir=args.cache or dirs.preprocess_cache, workers=args.threads,
        progress=lambda items, total: tqdm(items, total=total, desc="preprocess", unit="img"),
    )
    print(f"preprocess: {summary.line()}; see {out / 'skipped.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

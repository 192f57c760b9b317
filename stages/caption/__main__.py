"""python -m stages.caption: write one caption per preprocessed image (see --help)."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from stages.caption.captions import write_captions
from stages.caption.settings import CaptionSettings
from stages.common.layout import StageDirs
from stages.common.stage_cli import read_settings, run_stage, stage_parser
from stages.common.workflow import STAGE_SECTIONS


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("caption", "Write caption/{image}.txt, captions.csv and (with the tagger) tags.csv for every preprocessed image.",
                          ("--preprocessed",), {
                              "--out": "output folder (default: {out_dir}/caption)",
                              "--store": "the tagger's persistent score cache (default: {out_dir}/cache/tagger)"})
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the tagger when caption.tagger.threads is 0 (default: all cores)")
    return parser


def main(args: argparse.Namespace) -> int:
    config = read_settings(args, STAGE_SECTIONS["caption"])
    dirs = StageDirs(config["out_dir"])
    preprocessed, out, store = args.preprocessed or dirs.preprocess, args.out or dirs.caption, args.store or dirs.tagger_store
    settings = CaptionSettings.from_section(config["caption"], source="--settings" if args.settings is not None else "config.yaml")
    summary = write_captions(preprocessed, out, settings, store, args.threads,
                             progress=lambda batches: tqdm(batches, desc="caption: tagger", unit="batch"))
    table = summary.table
    sources = ", ".join(f"{count} {source}" for source, count in table.source.value_counts().sort_index().items())
    print(f"caption: {len(table)} captions written to {out} ({sources})")
    if settings.uses_tagger:
        print(f"caption: tagger ran on {summary.tagged} image(s), {summary.tags_reused} from cached scores; scores in {out / 'tags.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

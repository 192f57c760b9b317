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
                              "--store": "the models' persistent cache: tagger and DeepDanbooru scores, BLIP sentences (default: {out_dir}/cache/tagger)"})
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the models (the tagger's when caption.tagger.threads is 0; default: all cores)")
    return parser


def progress_bar(batches: list, method: str):
    """Batches of images, with a bar counting images and their rate."""
    with tqdm(total=sum(len(batch) for batch in batches), desc=f"caption: {method}", unit="image") as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def main(args: argparse.Namespace) -> int:
    config = read_settings(args, STAGE_SECTIONS["caption"])
    dirs = StageDirs(config["out_dir"])
    preprocessed, out, store = args.preprocessed or dirs.preprocess, args.out or dirs.caption, args.store or dirs.tagger_store
    settings = CaptionSettings.from_section(config["caption"], source="--settings" if args.settings is not None else "config.yaml")
    summary = write_captions(preprocessed, out, settings, store, args.threads, progress=progress_bar)
    table = summary.table
    sources = ", ".join(f"{count} {source}" for source, count in table.source.value_counts().sort_index().items())
    print(f"caption: {len(table)} captions written to {out} ({sources})")
    for method, run in summary.runs.items():
        rate = f" at {run.images_per_second:.2f} images/s (model load included)" if run.images_per_second else ""
        cached = "cached sentences" if method == "blip" else "cached scores"
        where = "" if method == "blip" else f"; scores in {out / 'tags.csv'}"
        print(f"caption: {method} ran on {run.computed} image(s){rate}, {run.reused} from {cached}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

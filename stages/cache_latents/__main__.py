"""python -m stages.cache_latents: VAE-encode the preprocessed images once (see --help)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from stages.cache_latents.encode import cache_latents
from stages.common.stage_cli import add_settings_arguments, load_full_config, run_stage, section_from_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.cache_latents",
        description="Encode preprocessed images with the model's VAE into a content-keyed store; write latents/manifest.csv.",
    )
    add_settings_arguments(parser)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="also encode mirrored copies (default: preprocess.flip)")
    parser.add_argument("--preprocessed", type=Path, help="the preprocess stage's folder (default: {out_dir}/preprocess)")
    parser.add_argument("--out", type=Path, help="output folder for manifest.csv (default: {out_dir}/latents)")
    parser.add_argument("--store", type=Path, help="the persistent latent store (default: {out_dir}/cache/latents)")
    parser.add_argument("--batch-size", type=int, default=4)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.settings is not None:
        model = section_from_json("model", args.settings)
        if not (args.preprocessed and args.out and args.store):
            raise ValueError("--settings needs --preprocessed, --out and --store too")
        preprocessed, out, store, flip = args.preprocessed, args.out, args.store, bool(args.flip)
    else:
        config = load_full_config(args)
        model = config["model"]
        root = Path(config["out_dir"])
        preprocessed = args.preprocessed or root / "preprocess"
        out = args.out or root / "latents"
        store = args.store or root / "cache" / "latents"
        flip = config["preprocess"]["flip"] if args.flip is None else args.flip
    from stages.common.models import load_model  # heavy import after argument errors are reported

    bundle = load_model(model["path"], model["family"])
    summary = cache_latents(preprocessed, out, store, bundle.vae, bundle.identity, flip, args.batch_size,
                            progress=lambda items: tqdm(items, desc="cache_latents", unit="batch"))
    print(f"cache_latents: {summary.encoded} encoded, {summary.reused} reused from {store}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

"""python -m stages.cache_latents: VAE-encode the preprocessed images once (see --help)."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from stages.cache_latents.settings import CacheSettings
from stages.common.layout import StageDirs
from stages.common.stage_cli import read_settings, run_stage, stage_parser
from stages.common.workflow import STAGE_SECTIONS
from stages.common.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("cache_latents", "Encode preprocessed images (and their mirrored copies) with the model's VAE into a content-keyed "
                          "store that survives reruns; write latents/manifest.csv, the list training reads.", ("--preprocessed",), {
                              "--out": "output folder for manifest.csv (default: {out_dir}/latents)",
                              "--store": "the persistent latent store (default: {out_dir}/cache/latents)"})
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="also encode mirrored copies (default: preprocess.flip)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and file hashing (default: torch's own choice)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise InputError(f"--threads: {args.threads} is not a number of threads; give 0 (torch's choice) or more")
    config = read_settings(args, STAGE_SECTIONS["cache_latents"])
    dirs, model, settings = StageDirs(config["out_dir"]), config["model"], CacheSettings.from_section(config["cache_latents"])
    paths = {"preprocessed": args.preprocessed or dirs.preprocess, "out": args.out or dirs.latents, "store": args.store or dirs.latent_store,
             "flip": config["preprocess"]["flip"] if args.flip is None else args.flip}
    import torch  # heavy imports after argument errors are reported

    from stages.cache_latents.encode import cache_latents
    from stages.cache_latents.encoder import vae_fingerprint
    from stages.common.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_model(model["path"], model["family"])
    vae_identity = f"vae-{vae_fingerprint(bundle.vae)}"  # by weights: checkpoints that share a VAE share latents
    summary = cache_latents(paths["preprocessed"], paths["out"], paths["store"], bundle.vae, vae_identity, settings=settings, flip=paths["flip"],
                            progress=lambda samples, total: tqdm(samples, total=total, desc="cache_latents", unit="image"))
    print(f"cache_latents: {summary.line()}; store {paths['store'] / vae_identity} (VAE of {model['path']})")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main, build_parser()))

"""Which image hurts: the best checkpoint's loss on each image, on noise and timesteps every image shares.

Each image is scored on the same evenly spread timesteps and (per latent size) the same noise, so
its number differs from another image's only because of the image and its prompt. An image far
above the rest (more than OUTLIER_SIGMAS standard deviations above the mean) is one the embedding
cannot explain: an off-concept picture, a bad crop, or a caption that already names the concept.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from stages.common.latents import LatentExample
from stages.common.files import atomic_path
from stages.common.size_condition import parse_crop_box
from stages.common.textual_inversion import TextualInversion, spread_timesteps

log = logging.getLogger(__name__)

OUTLIER_SIGMAS = 2.0
IMAGE_LOSS_COLUMNS = ["rank", "image", "split", "loss", "z_score", "outlier", "hint", "caption"]
CROP_WARNING_FRACTION = 0.5  # a crop that kept less than this share of the source picture may have cut the concept off


def shared_noise(shape: tuple[int, ...], timesteps: int, seed: int) -> torch.Tensor:
    """One noise tensor per timestep for latents of `shape`: the same for every image of that size."""
    return torch.randn((timesteps, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def image_losses(model: TextualInversion, examples: list[LatentExample], prompts: list[str], held_out: set[str],
                 timesteps: int, seed: int, progress=None) -> pd.DataFrame:
    """Each image's mean loss over the shared timesteps (its flipped copy averaged in), one row per image."""
    spread = spread_timesteps(timesteps, model.bundle.scheduler.config.num_train_timesteps).to(model.device)
    noise: dict[tuple[int, ...], torch.Tensor] = {}
    by_image = defaultdict(list)
    indices = range(len(examples))
    for i in (progress(indices) if progress else indices):
        example = examples[i]
        mean = example.mean  # read from the cache file once
        if tuple(mean.shape) not in noise:
            noise[tuple(mean.shape)] = shared_noise(tuple(mean.shape), timesteps, seed).to(model.device)
        shared = noise[tuple(mean.shape)]
        latents = mean[None].expand(timesteps, -1, -1, -1).to(model.device)  # one image, every timestep in one batch
        loss = model.loss(latents, [prompts[i]] * timesteps, shared, spread, [example.size_condition] * timesteps)
        by_image[example.image].append(float(loss))
    captions = {e.image: e.caption for e in examples}
    return pd.DataFrame([{"image": image, "split": "held out" if image in held_out else "training",
                          "loss": sum(losses) / len(losses), "caption": captions[image]} for image, losses in by_image.items()])


def rank_images(table: pd.DataFrame, hints: dict[str, str] | None = None) -> pd.DataFrame:
    """image_loss.csv's table, worst first: rank 1 fits best, the last rank worst; outliers flagged with a hint."""
    table = table.copy()
    spread = table.loss.std(ddof=0)
    table["z_score"] = (table.loss - table.loss.mean()) / spread if spread > 0 else 0.0
    table["outlier"] = table.z_score > OUTLIER_SIGMAS
    table["rank"] = table.loss.rank(method="first").astype(int)
    table["hint"] = [(hints or {}).get(row.image, GENERIC_HINT) if row.outlier else "" for row in table.itertuples()]
    return table.sort_values(["loss", "image"], ascending=[False, True])[IMAGE_LOSS_COLUMNS].reset_index(drop=True)


GENERIC_HINT = ("far above the other images: check that it shows the concept (an off-concept image teaches the embedding "
                "something else); if it does, look at its crop and caption")


def outlier_hints(manifest: pd.DataFrame | None, captions: dict[str, str], concept_words: list[str]) -> dict[str, str]:
    """A plain-language guess per image at why it could stand out, from what preprocess and caption recorded.

    A crop that kept under half the source picture may have cut the concept off. A caption that names
    the concept (its init words) when most others do not leaves the embedding less to learn on that image.
    Anything else gets GENERIC_HINT: look at the picture.
    """
    words = {w.lower() for w in concept_words if len(w) > 2}
    named = {image: sorted(words & set(caption.lower().replace(",", " ").split())) for image, caption in captions.items()}
    usually_named = sum(bool(found) for found in named.values()) > len(named) / 2
    hints = {image: (f"its caption names the concept ({', '.join(found)}) where most captions do not: the words carry it, "
                     "not the embedding; take them out of the caption")
             for image, found in named.items() if found and not usually_named}
    for row in (manifest.itertuples() if manifest is not None else []):
        kept = _kept_fraction(row)
        if kept is not None and kept < CROP_WARNING_FRACTION and row.output not in hints:
            hints[row.output] = (f"the crop kept {kept:.0%} of the source picture ({row.source}); the concept may be cut off: "
                                 "check the crop, or try preprocess.mode: focal or bucket")
    return hints


def _kept_fraction(row) -> float | None:
    try:
        left, top, right, bottom = parse_crop_box(str(row.crop_box))
        return (right - left) * (bottom - top) / (float(row.width) * float(row.height))
    except (AttributeError, ValueError, ZeroDivisionError):
        return None  # no crop recorded (a manifest from elsewhere): no crop hint


def thumbnails(table: pd.DataFrame, images_dir: Path, target_dir: Path, size: int = 96) -> dict[str, str]:
    """A small JPEG per ranked image (the page shows dozens), by image name → file name in target_dir."""
    target_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for image in table.image:
        source, name = images_dir / image, Path(image).stem + ".jpg"
        try:
            with Image.open(source) as picture:
                thumb = picture.convert("RGB")
        except (OSError, ValueError) as error:  # the row stays, without a picture
            log.warning("no thumbnail for %s in the image ranking: %s (rerun preprocess if the folder changed)", source, error)
            continue
        thumb.thumbnail((size, size))
        with atomic_path(target_dir / name) as temp:
            thumb.save(temp, format="JPEG", quality=85)
        written[image] = name
    return written

"""Telling images apart: an exact digest of the pixels, and a perceptual hash for near-duplicates.

The perceptual hash is the 64-bit difference hash (dHash): shrink to 9×8 grey, one bit per
"is this pixel brighter than its right neighbour". Re-encodes, resizes and small edits flip few
bits; different pictures differ in about half. A colour layout (mean RGB of the four quarters)
goes with it, because the dHash alone cannot tell a flat red picture from a flat blue one.
(imagehash computes the same dHash, but would bring scipy and PyWavelets along for these lines.)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


def pixel_digest(image: Image.Image) -> str:
    """sha256 of the size and the RGB pixels: equal for the same picture saved as PNG, BMP or TIFF."""
    digest = hashlib.sha256(f"{image.mode}{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def difference_hash(image: Image.Image) -> str:
    """The 64-bit dHash of `image` as 16 hex digits."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX, reducing_gap=2.0), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def colour_layout(image: Image.Image) -> str:
    """Mean RGB of the four quarters as 24 hex digits.

    The dHash sees only brightness steps, so flat or smooth pictures of different colours share
    a hash; near-duplicates must also agree on this.
    """
    return image.convert("RGB").resize((2, 2), Image.Resampling.BOX, reducing_gap=2.0).tobytes().hex()


@dataclass(frozen=True)
class NearDuplicate:
    first: str
    second: str
    distance: int  # differing bits of 64


def find_near_duplicates(fingerprints: dict[str, tuple[str, str]], max_distance: int, max_colour_step: int = 24) -> list[NearDuplicate]:
    """Pairs of names whose (dHash, colour layout) fingerprints are close, in name order.

    Close: at most `max_distance` differing hash bits, and no quarter's mean channel more than
    `max_colour_step` apart. One row of comparisons at a time keeps memory linear; 10,000
    images take a few seconds.
    """
    names = list(fingerprints)
    if len(names) < 2:
        return []
    hashes = np.array([int(fingerprints[name][0], 16) for name in names], dtype=np.uint64)
    colours = np.array([np.frombuffer(bytes.fromhex(fingerprints[name][1]), dtype=np.uint8) for name in names], dtype=np.int16).reshape(len(names), -1)
    pairs = []
    for index in range(len(names) - 1):
        distances = np.bitwise_count(hashes[index + 1 :] ^ hashes[index])
        colour_steps = np.abs(colours[index + 1 :] - colours[index]).max(axis=1, initial=0)
        for offset in np.flatnonzero((distances <= max_distance) & (colour_steps <= max_colour_step)):
            pairs.append(NearDuplicate(names[index], names[index + 1 + int(offset)], int(distances[offset])))
    return pairs

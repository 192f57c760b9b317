"""Telling images apart: an exact digest of the pixels, and a perceptual hash for near-duplicates.

The perceptual hash is the 64-bit difference hash (dHash): shrink to 9×8 grey, one bit per
"is this pixel brighter than its right neighbour". Re-encodes, resizes and small edits flip few
bits; different pictures differ in about half. (imagehash computes the same thing, but would
bring scipy and PyWavelets along for these few lines.)
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


@dataclass(frozen=True)
class NearDuplicate:
    first: str
    second: str
    distance: int  # differing bits of 64


def find_near_duplicates(hashes: dict[str, str], max_distance: int) -> list[NearDuplicate]:
    """Pairs of names whose difference hashes differ in at most `max_distance` bits, in name order.

    One row of XORs at a time keeps memory linear; 10,000 images take about a second.
    """
    names = list(hashes)
    values = np.array([int(hashes[name], 16) for name in names], dtype=np.uint64)
    pairs = []
    for index in range(len(names) - 1):
        distances = np.bitwise_count(values[index + 1 :] ^ values[index])
        for offset in np.flatnonzero(distances <= max_distance):
            other = index + 1 + int(offset)
            pairs.append(NearDuplicate(names[index], names[other], int(distances[offset])))
    return pairs

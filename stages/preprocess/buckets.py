"""kohya-ss aspect-ratio buckets: a fixed list of sizes of about the same area, each image in the closest.

The list follows sd-scripts' make_bucket_resolutions (the square of the target area, then every
width from min_side to max_side in `step`s with the tallest height that keeps the area), and an
image goes to the bucket whose aspect ratio is nearest its own; it is scaled to cover that
bucket and its middle is kept, as kohya does when it trims to the bucket.
"""
from __future__ import annotations

import math


def make_bucket_resolutions(area: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """Sorted (width, height) buckets with sides in [min_side, max_side], multiples of `step`, area ≤ `area`."""
    buckets = {(int(math.sqrt(area) // step) * step,) * 2}
    width = min_side
    while width <= max_side:
        height = min(max_side, int(area // width // step) * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def select_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the aspect ratio closest to width/height; an exact size match wins."""
    if (width, height) in buckets:
        return (width, height)
    aspect = width / height
    return min(buckets, key=lambda bucket: abs(bucket[0] / bucket[1] - aspect))

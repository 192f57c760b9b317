"""Frame geometry: which box of a picture becomes the training image, and at what scale.

Boxes are (left, top, right, bottom) in the picture's pixels, as floats; Pillow resamples
straight from a float box, so nothing is lost to rounding before the resize.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # shrink by whole factors first: ~3x faster on photos, no visible difference


def cover_scale(width: int, height: int, target: tuple[int, int]) -> float:
    """The scale at which a width×height picture just covers `target` (what center/focal/bucket resize by)."""
    return max(target[0] / width, target[1] / height)


def contain_scale(width: int, height: int, target: tuple[int, int]) -> float:
    """The scale at which a width×height picture just fits inside `target` (what pad resizes by)."""
    return min(target[0] / width, target[1] / height)


def crop_box_around(width: int, height: int, target: tuple[int, int], point: tuple[float, float]) -> Box:
    """The largest box of the target's aspect ratio, centred on `point` as far as the picture's edges allow."""
    scale = cover_scale(width, height, target)
    crop_w, crop_h = min(width, target[0] / scale), min(height, target[1] / scale)
    left = min(max(point[0] - crop_w / 2, 0.0), width - crop_w)
    top = min(max(point[1] - crop_h / 2, 0.0), height - crop_h)
    return (left, top, left + crop_w, top + crop_h)


def render_box(image: Image.Image, box: Box, target: tuple[int, int]) -> Image.Image:
    """Cut `box` out of `image` and resample it to `target` in one step."""
    return image.resize(target, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def frame_center(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, Box]:
    """Scale so the image covers `size`, then cut the middle: (framed image, crop box)."""
    box = crop_box_around(image.width, image.height, size, (image.width / 2, image.height / 2))
    return render_box(image, box, size), box


def frame_pad(image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] | str) -> tuple[Image.Image, Box]:
    """Scale to fit inside `size` and letterbox with `fill` (a colour, or "edge": stretch the outer pixels)."""
    scale = contain_scale(image.width, image.height, size)
    fitted_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    fitted = image.resize(fitted_size, RESAMPLE, reducing_gap=REDUCING_GAP)
    left, top = (size[0] - fitted.width) // 2, (size[1] - fitted.height) // 2
    if fill == "edge":
        pixels = np.asarray(fitted)
        padding = ((top, size[1] - fitted.height - top), (left, size[0] - fitted.width - left), (0, 0))
        canvas = Image.fromarray(np.pad(pixels, padding, mode="edge"))
    else:
        canvas = Image.new("RGB", size, fill)
        canvas.paste(fitted, (left, top))
    return canvas, (0.0, 0.0, float(image.width), float(image.height))


def frame_none(image: Image.Image) -> tuple[Image.Image, Box]:
    """Keep the size, cut to multiples of 8 (the VAE's stride) from the bottom-right."""
    width, height = image.width // 8 * 8, image.height // 8 * 8
    return image.crop((0, 0, width, height)), (0.0, 0.0, float(width), float(height))


def split_aspect_ratio(width: int, height: int, target: tuple[int, int]) -> float:
    """AUTOMATIC1111's split ratio: the picture's short/long proportion relative to the target's (1 = same shape)."""
    if height > width:
        return (width * target[1]) / (height * target[0])
    return (height * target[0]) / (width * target[1])


def should_split(width: int, height: int, target: tuple[int, int], threshold: float) -> bool:
    """AUTOMATIC1111's rule: split when the picture is longer than the target and its ratio is at most `threshold`."""
    ratio = split_aspect_ratio(width, height, target)
    return ratio < 1.0 and ratio <= threshold


def split_boxes(width: int, height: int, target: tuple[int, int], overlap: float) -> list[Box]:
    """AUTOMATIC1111's split: scale the short side to the target, then windows along the long side.

    There are ceil((L - w·overlap) / (w·(1 - overlap))) windows of the target's length w over the
    scaled long side L, evenly spaced from one end to the other, so neighbours overlap by at
    least `overlap` of a window.
    """
    portrait = height > width
    scale = target[0] / width if portrait else target[1] / height
    long_side = (height if portrait else width) * scale
    window = target[1] if portrait else target[0]
    count = max(2, math.ceil((long_side - window * overlap) / (window * (1.0 - overlap))))
    step = (long_side - window) / (count - 1)
    boxes = []
    for index in range(count):
        start, end = step * index / scale, (step * index + window) / scale
        boxes.append((0.0, start, float(width), end) if portrait else (start, 0.0, end, float(height)))
    return boxes

"""builtin:demo — a handful of generated pictures of one concept, with caption sidecars.

The concept is a red, round-eared toy drawn at different places, sizes and backgrounds, so
the demo has real variation for an embedding to learn while needing no download.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from stages.common.paths import DEMO_DATASET as DEMO_NAME  # re-exported for preprocess
_BACKGROUNDS = [("green", (70, 140, 80)), ("blue", (60, 90, 170)), ("sandy", (210, 190, 140)), ("grey", (128, 128, 128))]


def _draw_toy(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    red, dark = (200, 30, 40), (30, 20, 20)
    draw.polygon([(cx - r, cy - r * 0.3), (cx - r * 0.6, cy - r * 1.4), (cx - r * 0.1, cy - r * 0.8)], fill=red)
    draw.polygon([(cx + r, cy - r * 0.3), (cx + r * 0.6, cy - r * 1.4), (cx + r * 0.1, cy - r * 0.8)], fill=red)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=red)
    for side in (-1, 1):
        draw.ellipse([cx + side * r * 0.4 - r * 0.12, cy - r * 0.25, cx + side * r * 0.4 + r * 0.12, cy - r * 0.01], fill=dark)
    draw.arc([cx - r * 0.3, cy, cx + r * 0.3, cy + r * 0.45], 20, 160, fill=dark, width=max(1, int(r * 0.06)))


def write_demo_dataset(folder: Path, count: int = 8, seed: int = 0) -> list[Path]:
    """Write `count` PNG images and their `.txt` captions into `folder`; same seed → same files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        width, height = rng.choice([(320, 256), (288, 320), (384, 288), (320, 320)])
        bg_name, bg = _BACKGROUNDS[index % len(_BACKGROUNDS)]
        image = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(image)
        for _ in range(6):  # background clutter, so the toy is what stays the same
            x, y = rng.randrange(width), rng.randrange(height)
            shade = tuple(min(255, c + rng.randint(-40, 40)) for c in bg)
            draw.rectangle([x, y, x + rng.randint(10, 60), y + rng.randint(10, 60)], fill=shade)
        radius = rng.uniform(0.18, 0.28) * min(width, height)
        cx = rng.uniform(0.4, 0.6) * width
        cy = rng.uniform(0.45, 0.6) * height
        _draw_toy(draw, cx, cy, radius)
        image = image.filter(ImageFilter.GaussianBlur(0.8))
        path = folder / f"toy_{index:02d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(f"a red toy on a {bg_name} background", encoding="utf-8")
        written.append(path)
    return written

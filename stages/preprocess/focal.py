"""The focal point of a picture, as AUTOMATIC1111's "auto focal point crop" finds it.

Like AUTOMATIC1111, three detectors each give a point on a copy scaled to just cover the target:
entropy (where a target-sized window holds the most varied detail), edges (the centroid of
strong corners, the bottom tenth left out so watermarks don't pull the crop down) and faces
(OpenCV's Haar cascades, which ship inside opencv-python-headless, so nothing is downloaded;
AUTOMATIC1111 prefers a YuNet model it downloads, and falls back to these cascades).
The focal point is the average of the points found, weighted by the configured weights of the
detectors that found something; the crop is then centred on it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageDraw

from stages.preprocess.framing import cover_scale

# First cascade that finds anything wins, as in AUTOMATIC1111 (which also tries eyes, upper bodies
# and three more frontal variants; those add little but time, and eyes fire on texture in photos).
FACE_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml")
FACE_SEARCH_SIDE = 256  # faces are searched on a copy this short; the smallest found is then 24/256 of it
FACE_SCALE_STEP = 1.15  # AUTOMATIC1111 uses 1.1; 1.15 tries ~30% fewer scales and finds the same faces
ENTROPY_LEVELS = 32  # grey levels in the entropy histogram
DEBUG_COLOURS = {"faces": (255, 0, 0), "entropy": (255, 255, 0), "edges": (0, 0, 255)}


@dataclass(frozen=True)
class FocalWeights:
    """preprocess.focal_*_weight (the schema's defaults are AUTOMATIC1111's 0.9, 0.15 and 0.5)."""

    faces: float
    entropy: float
    edges: float


@dataclass
class Evidence:
    """What one detector found: its points and their centroid, in working-copy pixels."""

    detector: str
    points: list[tuple[float, float]]
    weight: float = 0.0  # share of the final point, once normalised

    @property
    def centroid(self) -> tuple[float, float]:
        xs, ys = zip(*self.points)
        return sum(xs) / len(xs), sum(ys) / len(ys)


@dataclass
class FocalPoint:
    x: float  # in pixels of the picture it was searched on
    y: float
    evidence: list[Evidence] = field(default_factory=list)


def working_copy(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, float]:
    """`image` scaled to just cover `target` (AUTOMATIC1111 searches at that size), and that scale."""
    scale = cover_scale(image.width, image.height, target)
    size = (max(target[0], round(image.width * scale)), max(target[1], round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), scale


def entropy_point(grey: np.ndarray, window: tuple[int, int]) -> tuple[float, float] | None:
    """Centre of the window-sized strip with the highest Shannon entropy, sliding along the long side.

    Per-column (or per-row) histograms with a running sum give every window's histogram at once.
    """
    height, width = grey.shape
    horizontal = width - window[0] >= height - window[1]
    length, span = (width, window[0]) if horizontal else (height, window[1])
    if length <= span:
        return None  # the window is the whole picture: nothing to choose
    levels = (grey.astype(np.int32) * ENTROPY_LEVELS) // 256
    lines = levels if horizontal else levels.T  # columns along the long side
    bins = lines + np.arange(length)[np.newaxis, :] * ENTROPY_LEVELS  # one histogram per column
    per_line = np.bincount(bins.ravel(), minlength=length * ENTROPY_LEVELS).reshape(length, ENTROPY_LEVELS)
    running = np.vstack([np.zeros((1, ENTROPY_LEVELS), dtype=np.int64), np.cumsum(per_line, axis=0)])
    windows = running[span:] - running[:-span]
    probabilities = windows / windows.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(probabilities > 0, probabilities * np.log2(probabilities), 0.0), axis=1)
    if entropy.max() - entropy.min() < 1e-9:
        return None  # every window alike (a flat picture): entropy says nothing
    # windows tied for the most detail (a subject narrower than the window) → the middle one
    best = np.flatnonzero(entropy >= entropy.max() - 1e-9)
    centre = (best[0] + best[-1]) / 2 + span / 2
    return (centre, height / 2) if horizontal else (width / 2, centre)


def edge_points(grey: np.ndarray) -> list[tuple[float, float]]:
    """Strong corners (Shi-Tomasi), ignoring the bottom tenth where watermarks and signatures sit."""
    mask = np.full(grey.shape, 255, dtype=np.uint8)
    mask[int(grey.shape[0] * 0.9) :, :] = 0
    corners = cv2.goodFeaturesToTrack(grey, maxCorners=100, qualityLevel=0.04, minDistance=min(grey.shape) * 0.06, mask=mask)
    return [] if corners is None else [(float(x), float(y)) for x, y in corners.reshape(-1, 2)]


cv2.setNumThreads(1)  # the stage runs one worker process per core; OpenCV's own threads would oversubscribe them


@functools.lru_cache(maxsize=None)
def _cascade(name: str) -> cv2.CascadeClassifier:
    classifier = cv2.CascadeClassifier(cv2.data.haarcascades + name)
    if classifier.empty():
        raise RuntimeError(f"OpenCV's face cascade {name} did not load from {cv2.data.haarcascades}; reinstall opencv-python-headless")
    return classifier


def face_points(grey: np.ndarray) -> list[tuple[float, float]]:
    """Centres of the faces the first successful Haar cascade finds.

    The search runs on a copy whose short side is at most FACE_SEARCH_SIDE: a cascade's cost grows
    with the pixels times the scales tried, and faces too small to find there (under ~9% of the
    short side) hardly move a crop.
    """
    shrink = min(1.0, FACE_SEARCH_SIDE / min(grey.shape))
    small = cv2.resize(grey, (round(grey.shape[1] * shrink), round(grey.shape[0] * shrink)), interpolation=cv2.INTER_AREA) if shrink < 1 else grey
    for name in FACE_CASCADES:
        faces = _cascade(name).detectMultiScale(small, scaleFactor=FACE_SCALE_STEP, minNeighbors=7, minSize=(24, 24))
        if len(faces):
            return [((x + w / 2) / shrink, (y + h / 2) / shrink) for x, y, w, h in faces]
    return []


def find_focal_point(image: Image.Image, target: tuple[int, int], weights: FocalWeights) -> FocalPoint:
    """The weighted focal point of `image` (searched on the picture as given, which should just cover `target`)."""
    grey = np.asarray(image.convert("L"))
    found = []
    if weights.entropy > 0 and (point := entropy_point(grey, target)) is not None:
        found.append(Evidence("entropy", [point]))
    if weights.edges > 0 and (points := edge_points(grey)):
        found.append(Evidence("edges", points))
    if weights.faces > 0 and (points := face_points(grey)):
        found.append(Evidence("faces", points))
    total = sum(getattr(weights, evidence.detector) for evidence in found)
    if not found or total <= 0:
        return FocalPoint(image.width / 2, image.height / 2, found)  # nothing stands out: the middle
    for evidence in found:
        evidence.weight = getattr(weights, evidence.detector) / total
    x = sum(e.centroid[0] * e.weight for e in found)
    y = sum(e.centroid[1] * e.weight for e in found)
    return FocalPoint(x, y, found)


def draw_focal_debug(image: Image.Image, focal: FocalPoint, crop_box: tuple[float, float, float, float]) -> Image.Image:
    """A copy of `image` with each detector's points and centroid, the focal point and the crop (green)."""
    debug = image.copy()
    draw = ImageDraw.Draw(debug)
    radius = min(image.size) * 0.035
    for evidence in focal.evidence:
        colour = DEBUG_COLOURS[evidence.detector]
        for x, y in evidence.points:
            draw.rectangle([x - 2, y - 2, x + 2, y + 2], outline=colour)
        cx, cy = evidence.centroid
        r = max(3.0, radius * 2 * evidence.weight)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=2)
        draw.text((cx - r, cy - r - 12), f"{evidence.detector}: {evidence.weight:.2f}", fill=colour)
    draw.ellipse([focal.x - radius, focal.y - radius, focal.x + radius, focal.y + radius], outline=(0, 255, 0), width=3)
    draw.rectangle([crop_box[0], crop_box[1], crop_box[2] - 1, crop_box[3] - 1], outline=(0, 255, 0), width=2)
    return debug

"""SDXL size conditioning: the six numbers of diffusers' `add_time_ids` for one training image.

They are (original_height, original_width, crop_top, crop_left, target_height, target_width),
taken from the image's row of the preprocess manifest (out/preprocess/manifest.csv):

- original: the source's (height, width), its full upright size (manifest `height`, `width`).
- bucket mode (`bucket` "WxH"): kohya sd-scripts' rule, `get_crop_ltrb(bucket, image size)`:
  the image fitted inside the bucket and centred, crop top-left = where it starts (floored);
  target = the bucket. A flipped copy gets kohya's `(bucket_w - crop_right, crop_top)`.
- crop-box modes (center, focal, split parts, pad, none; `bucket` ""): the convention of
  Stability's and diffusers' train_text_to_image_sdxl.py, the crop's top-left in the source
  resized so the crop has the target size: scale = out_width / (right - left),
  crop = (round(top·scale), round(left·scale)); target = (out_height, out_width). A flipped copy
  gets the crop mirrored in that resized source: round(width·scale) - crop_left - out_width, at
  least 0. Pad mode's box is the whole source (padding crops nothing), so its crop is (0, 0).
"""
from __future__ import annotations

from typing import Mapping

SizeCondition = tuple[int, int, int, int, int, int]

# the preprocess manifest columns the rule reads; older manifests lack some
MANIFEST_FIELDS = ("width", "height", "crop_box", "bucket", "out_width", "out_height")


def size_condition(width: int, height: int, crop_box: str, bucket: str, out_width: int, out_height: int,
                   flipped: bool = False) -> SizeCondition:
    """(original_height, original_width, crop_top, crop_left, target_height, target_width) for one manifest row.

    `crop_box` is "left top right bottom" in source pixels, `bucket` "WxH" or "". Raises ValueError
    saying which value is malformed.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"source size {width}x{height} is not positive")
    if bucket:
        bucket_w, bucket_h = _parse_bucket(bucket)
        crop_left, crop_top, crop_right = _kohya_crop(bucket_w, bucket_h, width, height)
        if flipped:
            crop_left = bucket_w - crop_right
        return (height, width, int(crop_top), int(crop_left), bucket_h, bucket_w)
    left, top, right, _ = parse_crop_box(crop_box)
    scale = out_width / (right - left)
    crop_top, crop_left = round(top * scale), round(left * scale)
    if flipped:
        crop_left = max(0, round(width * scale) - crop_left - out_width)
    return (height, width, crop_top, crop_left, out_height, out_width)


def size_condition_of_row(row: Mapping[str, object], flipped: bool = False) -> SizeCondition | None:
    """size_condition from a manifest row read as strings; None when the row lacks the fields (an older manifest)."""
    if any(row.get(name) in (None, "") for name in MANIFEST_FIELDS if name != "bucket") or row.get("bucket") is None:
        return None
    try:
        sizes = {name: int(float(str(row[name]))) for name in ("width", "height", "out_width", "out_height")}
    except ValueError:
        raise ValueError("width, height, out_width and out_height must be whole numbers, found "
                         + ", ".join(f"{name} {row[name]!r}" for name in ("width", "height", "out_width", "out_height"))) from None
    return size_condition(sizes["width"], sizes["height"], str(row["crop_box"]), str(row["bucket"]),
                          sizes["out_width"], sizes["out_height"], flipped)


def _kohya_crop(bucket_w: int, bucket_h: int, width: int, height: int) -> tuple[float, float, float]:
    """kohya's get_crop_ltrb: (crop_left, crop_top, crop_right) of the image fitted inside the bucket."""
    bucket_ar, image_ar = bucket_w / bucket_h, width / height
    if bucket_ar > image_ar:
        resized_w, resized_h = bucket_h * image_ar, bucket_h
    else:
        resized_w, resized_h = bucket_w, bucket_w / image_ar
    crop_left = (bucket_w - resized_w) // 2
    crop_top = (bucket_h - resized_h) // 2
    return crop_left, crop_top, crop_left + resized_w


def _parse_bucket(bucket: str) -> tuple[int, int]:
    try:
        bucket_w, bucket_h = (int(side) for side in bucket.lower().split("x"))
    except ValueError:
        raise ValueError(f"bucket {bucket!r} is not WIDTHxHEIGHT") from None
    if bucket_w <= 0 or bucket_h <= 0:
        raise ValueError(f"bucket {bucket!r} has a side that is not positive")
    return bucket_w, bucket_h


def parse_crop_box(crop_box: str) -> tuple[float, float, float, float]:
    """preprocess's manifest crop_box, "left top right bottom" in source pixels. Raises ValueError."""
    try:
        left, top, right, bottom = (float(v) for v in crop_box.split())
    except ValueError:
        raise ValueError(f"crop_box {crop_box!r} is not four numbers 'left top right bottom'") from None
    if right <= left or bottom <= top:
        raise ValueError(f"crop_box {crop_box!r} is empty (right <= left or bottom <= top)")
    return left, top, right, bottom

"""preprocess, one piece at a time: framing geometry, focal point, buckets, splits, loading, captions, settings."""
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from stages.preprocess.buckets import make_bucket_resolutions, select_bucket
from stages.preprocess.duplicates import colour_layout, difference_hash, find_near_duplicates, pixel_digest
from stages.preprocess.focal import FocalWeights, face_points, find_focal_point, working_copy
from stages.preprocess.framing import frame_center, frame_none, frame_pad, should_split, split_boxes
from stages.preprocess.images import load_rgb, load_source
from stages.preprocess.process import frame_picture
from stages.preprocess.settings import PreprocessSettings
from stages.preprocess.sources import SkipImage, read_caption

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(path, size=(120, 80), color=(200, 30, 40), mode="RGB", **kwargs):
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def draw_face(image: Image.Image, cx: float, cy: float, s: float) -> Image.Image:
    """A plain drawn face (skin oval, brows, eyes, nose, mouth) that OpenCV's frontal cascade finds."""
    draw = ImageDraw.Draw(image)
    draw.ellipse([cx - s * 0.5, cy - s * 0.65, cx + s * 0.5, cy + s * 0.65], fill=(225, 185, 160))
    for side in (-1, 1):
        eye = cx + side * s * 0.2
        draw.ellipse([eye - s * 0.09, cy - s * 0.2, eye + s * 0.09, cy - s * 0.1], fill=(40, 30, 30))
        draw.rectangle([eye - s * 0.13, cy - s * 0.3, eye + s * 0.13, cy - s * 0.26], fill=(60, 40, 30))
    draw.polygon([(cx, cy - s * 0.05), (cx - s * 0.07, cy + s * 0.15), (cx + s * 0.07, cy + s * 0.15)], fill=(190, 140, 120))
    draw.rectangle([cx - s * 0.18, cy + s * 0.3, cx + s * 0.18, cy + s * 0.36], fill=(150, 60, 60))
    return image


def busy_patch(image: Image.Image, box: tuple[int, int, int, int], seed: int = 0) -> Image.Image:
    """Paste a checkerboard of random greys: high entropy and many corners."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=((box[3] - box[1]) // 8, (box[2] - box[0]) // 8), dtype=np.uint8)
    patch = Image.fromarray(np.kron(cells, np.ones((8, 8), dtype=np.uint8))).convert("RGB")
    image.paste(patch, box[:2])
    return image


# --- framing geometry: output size and where the subject lands ---

def test_center_crop_keeps_the_middle():
    image = Image.new("RGB", (300, 100), "black")
    image.paste(RED, (100, 0, 200, 100))  # red square in the middle third
    framed, box = frame_center(image, (64, 64))
    assert framed.size == (64, 64) and box == (100, 0, 200, 100)
    assert framed.getpixel((2, 32))[0] > 200 and framed.getpixel((61, 32))[0] > 200


def test_center_crop_to_a_landscape_frame_cuts_top_and_bottom():
    image = Image.new("RGB", (100, 200), "black")
    image.paste(RED, (0, 75, 100, 125))
    framed, box = frame_center(image, (64, 32))
    assert framed.size == (64, 32) and box == (0, 75, 100, 125)
    assert framed.getpixel((32, 1))[0] > 200 and framed.getpixel((32, 30))[0] > 200


def test_pad_keeps_everything_and_fills():
    framed, box = frame_pad(Image.new("RGB", (200, 100), BLUE), (64, 64), WHITE)
    assert framed.size == (64, 64) and box == (0, 0, 200, 100)
    assert framed.getpixel((32, 2)) == WHITE and framed.getpixel((32, 32)) == BLUE and framed.getpixel((32, 61)) == WHITE


def test_pad_edge_fill_stretches_the_outer_pixels():
    image = Image.new("RGB", (200, 100), BLUE)
    image.paste(RED, (0, 0, 200, 10))  # red top rows: the top border repeats them
    framed, _ = frame_pad(image, (64, 64), "edge")
    assert framed.getpixel((32, 0)) == RED and framed.getpixel((32, 63)) == BLUE


def test_none_keeps_the_size_cut_to_multiples_of_8():
    framed, box = frame_none(Image.new("RGB", (203, 117), BLUE))
    assert framed.size == (200, 112) and box == (0, 0, 200, 112)


def test_focal_crop_lands_on_the_busy_subject_not_the_middle():
    image = busy_patch(Image.new("RGB", (600, 200), (128, 128, 128)), (440, 40, 560, 160))
    work, scale = working_copy(image, (64, 64))
    focal = find_focal_point(work, (64, 64), FocalWeights(faces=0.0, entropy=0.5, edges=0.5))
    assert 440 <= focal.x / scale <= 560
    assert {e.detector for e in focal.evidence} == {"entropy", "edges"}


def test_faces_outweigh_detail_when_the_face_weight_is_high():
    image = Image.new("RGB", (768, 384), (90, 120, 150))
    draw_face(image, 150, 190, 160)  # face on the left, busy texture on the right
    busy_patch(image, (560, 100, 720, 300))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    grey = np.asarray(image.convert("L"))
    faces = face_points(grey)
    assert len(faces) == 1 and abs(faces[0][0] - 150) < 20 and abs(faces[0][1] - 190) < 30
    face_first = find_focal_point(image, (384, 384), FocalWeights(faces=0.9, entropy=0.15, edges=0.0))
    detail_only = find_focal_point(image, (384, 384), FocalWeights(faces=0.0, entropy=0.15, edges=0.5))
    assert face_first.x < 300 and detail_only.x > 450


def test_focal_point_of_a_featureless_picture_is_the_middle():
    focal = find_focal_point(Image.new("RGB", (300, 200), (50, 50, 50)), (200, 200), FocalWeights(faces=0.9, entropy=0.15, edges=0.5))
    assert (focal.x, focal.y) == (150, 100)


# --- kohya buckets ---

def test_buckets_match_kohya_for_512():
    buckets = make_bucket_resolutions(512 * 512, 256, 1024, 64)
    for bucket in [(512, 512), (384, 640), (640, 384), (448, 576), (320, 768), (256, 1024), (1024, 256)]:
        assert bucket in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)


def test_an_image_goes_to_the_bucket_of_nearest_aspect_ratio():
    buckets = make_bucket_resolutions(512 * 512)
    assert select_bucket(3000, 2000, buckets) == (640, 384)
    assert select_bucket(2000, 3000, buckets) == (384, 640)
    assert select_bucket(777, 777, buckets) == (512, 512)


def test_bucket_framing_keeps_the_middle_at_the_bucket_size():
    image = Image.new("RGB", (600, 300), BLUE)
    image.paste(RED, (50, 0, 550, 300))  # the blue ends fall outside the 320x192 bucket's crop
    settings = PreprocessSettings.from_schema(size=(256, 256), mode="bucket", bucket_min_side=128, bucket_max_side=512)
    [(framed, box, bucket)], _ = frame_picture(image, 600, 300, settings)
    assert bucket == "320x192" and framed.size == (320, 192) and box == (50, 0, 550, 300)
    assert framed.getpixel((0, 96))[0] > 200 and framed.getpixel((319, 96))[0] > 200


# --- AUTOMATIC1111 split ---

def test_split_threshold_follows_automatic1111():
    assert should_split(100, 300, (64, 64), 0.5)  # ratio 1/3
    assert not should_split(100, 150, (64, 64), 0.5)  # ratio 2/3 is above the threshold
    assert not should_split(100, 100, (64, 64), 1.0)  # same shape as the frame: never


def test_split_windows_cover_the_long_side_with_the_overlap():
    boxes = split_boxes(64, 200, (64, 64), overlap=0.2)
    assert len(boxes) == 4  # ceil((200 - 12.8) / 51.2)
    assert boxes[0][1] == 0 and boxes[-1][3] == pytest.approx(200)
    assert all(b[0] == 0 and b[2] == 64 and b[3] - b[1] == pytest.approx(64) for b in boxes)
    assert all(first[3] - second[1] >= 0.2 * 64 for first, second in zip(boxes, boxes[1:]))


# --- loading: orientation, colour, odd formats ---

def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (120, 80), BLUE)
    image.paste(RED, (0, 0, 40, 80))  # red on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the red band ends up on top
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    loaded = load_rgb(tmp_path / "r.jpg")
    assert loaded.size == (80, 120)
    assert loaded.getpixel((40, 10))[0] > 200 and loaded.getpixel((40, 110))[2] > 200


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 0)])
def test_transparency_is_composited_on_the_background(tmp_path, background):
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((255, 0, 0, 128), (50, 0, 100, 100))  # half-transparent red on the right
    image.save(tmp_path / "a.png")
    loaded = load_rgb(tmp_path / "a.png", background=background)
    assert loaded.getpixel((10, 50)) == background
    expected = tuple(round((255 * 128 + b * 127) / 255) if i == 0 else round(b * 127 / 255) for i, b in enumerate(background))
    assert all(abs(a - e) <= 1 for a, e in zip(loaded.getpixel((90, 50)), expected))


def test_palette_transparency_is_not_black(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 64))
    image.save(tmp_path / "p.gif", transparency=0)
    loaded = load_rgb(tmp_path / "p.gif")
    assert loaded.getpixel((5, 5)) == WHITE and loaded.getpixel((50, 5)) == RED


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    source = load_source(tmp_path / "anim.gif")
    assert source.animated and source.image.getpixel((10, 10)) == RED


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert abs(load_rgb(tmp_path / "deep.png").getpixel((5, 5))[0] - 128) <= 1


def test_cmyk_jpeg_and_tiff_load_as_rgb(tmp_path):
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # full magenta + yellow = red
    _save(tmp_path / "t.tiff", size=(64, 64), color=BLUE)
    red = load_rgb(tmp_path / "c.jpg").getpixel((5, 5))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert load_rgb(tmp_path / "t.tiff").getpixel((5, 5)) == BLUE


def test_large_jpegs_decode_reduced_but_report_their_full_size(tmp_path):
    _save(tmp_path / "big.jpg", size=(2000, 1200), color=BLUE)
    source = load_source(tmp_path / "big.jpg", scale_for=lambda w, h: 64 / h)
    assert (source.width, source.height) == (2000, 1200)
    assert source.image.height >= 64 and source.image.width < 1000  # decoded at 1/8 or 1/16 of the pixels


def bad_file_bytes(kind: str) -> bytes:
    """Bytes of a broken file of each kind users' folders hold."""
    buffer = io.BytesIO()
    busy_patch(Image.new("RGB", (96, 96)), (0, 0, 96, 96)).save(buffer, format="PNG")
    good = buffer.getvalue()
    if kind == "empty":
        return b""
    if kind == "not an image":
        return b"this is a note, not a picture"
    if kind == "truncated":
        return good[: len(good) // 2]
    corrupt = bytearray(good)  # damage the compressed pixel data, keep the header intact
    corrupt[len(good) // 2 : len(good) // 2 + 64] = bytes(64)
    return bytes(corrupt)


@pytest.mark.parametrize("kind, reason", [("empty", "0 bytes"), ("not an image", "not an image"),
                                          ("truncated", "^truncated"), ("corrupt", "^corrupt")])
def test_bad_files_raise_skip_with_a_reason(tmp_path, kind, reason):
    (tmp_path / "bad.png").write_bytes(bad_file_bytes(kind))
    with pytest.raises(SkipImage, match=reason):
        load_rgb(tmp_path / "bad.png")


def test_decompression_bombs_are_refused_at_the_configured_limit(tmp_path):
    _save(tmp_path / "big.png", size=(200, 200))
    assert load_rgb(tmp_path / "big.png", max_pixels=40_000).size == (200, 200)
    with pytest.raises(SkipImage, match="decompression bomb.*max_pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=39_999)


# --- duplicates ---

def test_near_duplicates_need_close_hashes_and_close_colours():
    photo = busy_patch(Image.new("RGB", (96, 96)), (0, 0, 96, 96), seed=3)
    brighter = photo.point(lambda v: min(255, v + 6))
    other = busy_patch(Image.new("RGB", (96, 96)), (0, 0, 96, 96), seed=4)
    flat_red, flat_blue, flat_red_too = (Image.new("RGB", (96, 96), c) for c in (RED, BLUE, (250, 5, 5)))
    pictures = {"photo": photo, "brighter": brighter, "other": other, "red": flat_red, "blue": flat_blue, "red2": flat_red_too}
    fingerprints = {name: (difference_hash(p), colour_layout(p)) for name, p in pictures.items()}
    pairs = {(pair.first, pair.second) for pair in find_near_duplicates(fingerprints, max_distance=4)}
    assert pairs == {("photo", "brighter"), ("red", "red2")}
    assert pixel_digest(photo) == pixel_digest(photo.copy()) != pixel_digest(brighter)


# --- captions ---

@pytest.mark.parametrize("encoding, text", [
    ("utf-8", "red toy, 赤"),
    ("utf-8-sig", "red toy, 赤"),
    ("shift_jis", "赤いおもちゃ"),
    ("gbk", "红色玩具"),
    ("gbk", "猫咪在草地上"),  # these GBK bytes are valid Shift_JIS too, as half-width katakana
])
def test_caption_encodings(tmp_path, encoding, text):
    (tmp_path / "c.txt").write_bytes(text.encode(encoding))
    assert read_caption(tmp_path / "c.txt") == text


# --- settings ---

def test_settings_refuse_inconsistent_combinations():
    with pytest.raises(ValueError, match="preprocess.split"):
        PreprocessSettings.from_schema(size=(512, 512), mode="bucket", split=True)
    with pytest.raises(ValueError, match="bucket_min_side"):
        PreprocessSettings.from_schema(size=(128, 128), mode="bucket")  # the 128 square bucket is below the 256 minimum
    with pytest.raises(ValueError, match="preprocess.fill"):
        PreprocessSettings.from_schema(size=512, mode="pad", fill="not-a-colour")


def test_cache_key_changes_only_with_what_shapes_the_images():
    base = PreprocessSettings.from_schema(size=(512, 512))
    assert base.cache_key() == PreprocessSettings.from_schema(size=(512, 512), flip=True, focal_face_weight=0.1).cache_key()
    assert base.cache_key() != PreprocessSettings.from_schema(size=(256, 256)).cache_key()
    focal = PreprocessSettings.from_schema(size=(512, 512), mode="focal")
    assert focal.cache_key() != PreprocessSettings.from_schema(size=(512, 512), mode="focal", focal_face_weight=0.1).cache_key()

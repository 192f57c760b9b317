import pandas as pd
import pytest
from PIL import Image

from stages.preprocess.images import frame_center, frame_pad, load_rgb, read_caption
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder


def _save(path, size=(120, 80), color=(200, 30, 40), mode="RGB", **kwargs):
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def test_center_crop_keeps_the_middle():
    image = Image.new("RGB", (300, 100), "black")
    image.paste((255, 0, 0), (100, 0, 200, 100))  # red square in the middle third
    framed, box = frame_center(image, (64, 64))
    assert framed.size == (64, 64) and box == (100, 0, 200, 100)
    assert framed.getpixel((2, 32))[0] > 200 and framed.getpixel((61, 32))[0] > 200


def test_pad_keeps_everything_and_fills():
    framed, _ = frame_pad(Image.new("RGB", (200, 100), (0, 0, 255)), (64, 64), (255, 255, 255))
    assert framed.size == (64, 64)
    assert framed.getpixel((32, 2)) == (255, 255, 255) and framed.getpixel((32, 32)) == (0, 0, 255)


def test_alpha_is_composited_on_white(tmp_path):
    path = _save(tmp_path / "a.png", color=(0, 0, 0, 0), mode="RGBA")
    assert load_rgb(path).getpixel((5, 5)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = _save(tmp_path / "r.jpg", size=(120, 80), exif=exif)
    assert load_rgb(path).size == (80, 120)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "shift_jis", "gbk"])
def test_caption_encodings(tmp_path, encoding):
    text = "赤いおもちゃ" if encoding == "shift_jis" else ("红色玩具" if encoding == "gbk" else "red toy, 赤")
    (tmp_path / "c.txt").write_bytes(text.encode(encoding))
    assert read_caption(tmp_path / "c.txt") == text


def test_bad_files_are_skipped_with_reasons_and_the_rest_processed(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    _save(source / "good.png")
    _save(source / "z_copy.png")  # same bytes as good.png, listed after it
    (source / "good.txt").write_text("a red block")
    (source / "empty.jpg").write_bytes(b"")
    (source / "fake.png").write_text("this is not an image")
    good_bytes = (source / "good.png").read_bytes()
    (source / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    _save(source / "tiny.png", size=(20, 20), color=(1, 2, 3))
    (source / "notes.docx").write_bytes(b"PK")
    (source / "Thumbs.db").write_bytes(b"junk")
    out = tmp_path / "out"
    summary = preprocess_folder(source, out, PreprocessSettings(size=(64, 64)))
    skipped = pd.read_csv(out / "skipped.csv").set_index("file").reason.to_dict()
    reasons = {k.split("/")[-1]: v for k, v in skipped.items()}
    assert set(reasons) == {"z_copy.png", "empty.jpg", "fake.png", "truncated.png", "tiny.png", "notes.docx"}
    assert "same file content" in reasons["z_copy.png"] and "0 bytes" in reasons["empty.jpg"]
    assert "not an image" in reasons["fake.png"] and "truncated" in reasons["truncated.png"]
    assert "too small" in reasons["tiny.png"]
    manifest = pd.read_csv(out / "manifest.csv")
    assert summary.kept == 1 and list(manifest.output) == ["good.png"]
    assert Image.open(out / "good.png").size == (64, 64)
    assert (out / "good.txt").read_text(encoding="utf-8") == "a red block"


def test_a_folder_with_no_usable_image_stops_with_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable image"):
        preprocess_folder(tmp_path / "src", tmp_path / "out", PreprocessSettings(size=(64, 64)))

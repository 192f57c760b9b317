"""preprocess over whole folders: bad inputs, duplicates, captions, splits, buckets, the cache and the CLI."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from conftest import REPO
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder
from test_preprocess import bad_file_bytes, busy_patch

SMALL = PreprocessSettings.from_schema(size=(64, 64))


def picture(path, size=(96, 96), seed=0, **save):
    """A distinct busy picture (seeded), so no two are near-duplicates by accident."""
    path.parent.mkdir(parents=True, exist_ok=True)
    busy_patch(Image.new("RGB", size), (0, 0, size[0] // 8 * 8, size[1] // 8 * 8), seed=seed).save(path, **save)
    return path


def run(source, out, settings=SMALL, **kwargs):
    summary = preprocess_folder(source, out, settings, cache_dir=out.parent / "cache", **kwargs)
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    skipped = pd.read_csv(out / "skipped.csv", keep_default_na=False)
    return summary, manifest, {os.path.basename(f): r for f, r in zip(skipped.file, skipped.reason)}


def test_every_bad_file_is_skipped_with_its_reason_and_the_rest_is_processed(tmp_path):
    src = tmp_path / "src"
    picture(src / "good.png")
    for kind, name in [("empty", "empty.jpg"), ("not an image", "fake.png"), ("truncated", "truncated.png"), ("corrupt", "corrupt.png")]:
        (src / name).write_bytes(bad_file_bytes(kind))
    picture(src / "bomb.png", size=(400, 400), seed=1)
    picture(src / "tiny.png", size=(24, 24), seed=2)
    picture(src / "small.png", size=(96, 40), seed=3)  # a 64 px frame from 40 px high: 1.6x upscale
    (src / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    os.symlink("/proc/self/mem", src / "unreadable.jpg")  # a file whose read fails with an I/O error
    settings = PreprocessSettings.from_schema(size=(64, 64), min_side=32, max_upscale=1.5, max_pixels=100_000)
    summary, manifest, reasons = run(src, tmp_path / "out", settings)
    assert list(manifest.output) == ["good.png"] and summary.kept == 1
    assert set(reasons) == {"empty.jpg", "fake.png", "truncated.png", "corrupt.png", "bomb.png", "tiny.png", "small.png", "phone.heic", "unreadable.jpg"}
    assert "0 bytes" in reasons["empty.jpg"] and "not an image" in reasons["fake.png"]
    assert reasons["truncated.png"].startswith("truncated") and reasons["corrupt.png"].startswith("corrupt")
    assert "decompression bomb" in reasons["bomb.png"] and "min_side" in reasons["tiny.png"]
    assert "max_upscale" in reasons["small.png"] and "HEIC" in reasons["phone.heic"]
    assert reasons["unreadable.jpg"].startswith("unreadable")


def test_stray_files_are_ignored_quietly_and_an_image_without_extension_is_used(tmp_path):
    src = tmp_path / "src"
    picture(src / "a.png")
    picture(src / "photo_without_extension", seed=1, format="PNG")
    for name in ["Thumbs.db", ".DS_Store", "notes.docx", "README.md", "orphan.txt"]:
        (src / name).write_bytes(b"stray bytes")
    (src / ".hidden").mkdir()
    picture(src / ".hidden" / "cached.png", seed=2)
    summary, manifest, reasons = run(src, tmp_path / "out", PreprocessSettings.from_schema(size=(64, 64), recursive=True))
    assert sorted(manifest.output) == ["a.png", "photo_without_extension.png"]
    assert reasons == {} and summary.ignored == 2  # notes.docx and README.md


def test_exact_duplicates_are_collapsed_with_a_note_and_near_duplicates_reported(tmp_path):
    src = tmp_path / "src"
    picture(src / "a.png")
    (src / "b_copy.png").write_bytes((src / "a.png").read_bytes())  # same file
    Image.open(src / "a.png").save(src / "c_same_pixels.bmp")  # same pixels, another format
    Image.open(src / "a.png").save(src / "d_reencoded.jpg", quality=70)  # near-duplicate
    picture(src / "e_other.png", seed=5)
    summary, manifest, reasons = run(src, tmp_path / "out")
    assert list(manifest.source.map(os.path.basename)) == ["a.png", "d_reencoded.jpg", "e_other.png"]
    assert "same file content as" in reasons["b_copy.png"] and "same pixels as" in reasons["c_same_pixels.bmp"]
    assert manifest.duplicates[0] == f"{src / 'b_copy.png'}; {src / 'c_same_pixels.bmp'}"
    near = pd.read_csv(tmp_path / "out" / "near_duplicates.csv")
    assert [(os.path.basename(a), os.path.basename(b)) for a, b in zip(near["first"], near["second"])] == [("a.png", "d_reencoded.jpg")]
    assert (summary.duplicates, summary.near_duplicates) == (2, 1)


def test_of_two_identical_images_the_captioned_one_is_kept(tmp_path, caplog):
    src = tmp_path / "src"
    picture(src / "shape_0.png")
    (src / "shape_0.txt").write_text("a red square", encoding="utf-8")
    (src / "dup_of_0.png").write_bytes((src / "shape_0.png").read_bytes())  # sorts first, has no caption
    picture(src / "two.png", seed=2)
    (src / "two.txt").write_text("circle", encoding="utf-8")
    (src / "two_tagged.png").write_bytes((src / "two.png").read_bytes())
    (src / "two_tagged.txt").write_text("blue circle, white background, simple", encoding="utf-8")  # the richer caption
    out = tmp_path / "out"
    summary, manifest, reasons = run(src, out)
    rows = manifest.set_index(manifest.source.map(os.path.basename))
    assert sorted(rows.index) == ["shape_0.png", "two_tagged.png"] and summary.duplicates == 2
    assert (out / rows.caption["shape_0.png"]).read_text(encoding="utf-8") == "a red square"
    assert (out / rows.caption["two_tagged.png"]).read_text(encoding="utf-8") == "blue circle, white background, simple"
    assert "kept instead for its caption" in reasons["dup_of_0.png"] and "kept instead for its richer caption" in reasons["two.png"]
    assert rows.duplicates["shape_0.png"] == str(src / "dup_of_0.png")
    assert "same picture: kept" in caplog.text and any(r.levelname == "WARNING" for r in caplog.records if "same picture" in r.message)


def test_a_folder_without_usable_images_names_each_reason_in_the_error(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    (src / "fake.png").write_bytes(bad_file_bytes("not an image"))
    with pytest.raises(ValueError) as error:
        preprocess_folder(src, tmp_path / "out", SMALL, cache_dir=tmp_path / "cache")
    message = str(error.value)  # Snakemake deletes skipped.csv after a failure; the message carries the reasons
    assert "2 files skipped" in message and "empty.jpg: " in message and "0 bytes" in message and "fake.png: " in message


def test_captions_travel_decoded_to_utf8_with_a_configurable_extension(tmp_path):
    src = tmp_path / "src"
    for index, name in enumerate(["jp", "kohya", "none"]):
        picture(src / f"{name}.png", seed=index)
    (src / "jp.txt").write_bytes("赤いおもちゃ".encode("shift_jis"))
    (src / "kohya.caption").write_text("from the caption file", encoding="utf-8")
    (src / "kohya.txt").write_text("the .txt loses to .caption", encoding="utf-8")
    out = tmp_path / "out"
    _, manifest, _ = run(src, out, PreprocessSettings.from_schema(size=(64, 64), caption_extension=".caption"))
    rows = manifest.set_index("output")
    assert (out / rows.caption["jp.png"]).read_text(encoding="utf-8") == "赤いおもちゃ"
    assert (out / rows.caption["kohya.png"]).read_text(encoding="utf-8") == "from the caption file"
    assert rows.caption_source["kohya.png"] == "kohya.caption" and rows.caption["none.png"] == ""


def test_recursive_reads_subfolders_and_keeps_names_apart(tmp_path):
    src = tmp_path / "src"
    picture(src / "top.png")
    picture(src / "cats" / "a.png", seed=1)
    picture(src / "dogs" / "a.png", seed=2)
    _, flat, _ = run(src, tmp_path / "flat")
    _, deep, _ = run(src, tmp_path / "deep", PreprocessSettings.from_schema(size=(64, 64), recursive=True))
    assert list(flat.output) == ["top.png"]
    assert sorted(deep.output) == ["cats_a.png", "dogs_a.png", "top.png"]


def test_oversized_images_split_into_parts_sharing_the_caption(tmp_path):
    src = tmp_path / "src"
    picture(src / "tall.png", size=(64, 200))
    (src / "tall.txt").write_text("a tall picture")
    settings = PreprocessSettings.from_schema(size=(64, 64), split=True, split_threshold=0.5, split_overlap=0.2)
    summary, manifest, _ = run(src, tmp_path / "out", settings)
    assert list(manifest.output) == [f"tall-part{i}.png" for i in range(1, 5)] and list(manifest.part) == [1, 2, 3, 4]
    assert set(manifest.caption) == {"tall.txt"} and summary.images == 4 and summary.kept == 1
    assert manifest.crop_box[0] == "0 0 64 64" and manifest.crop_box[3] == "0 136 64 200"


def test_bucket_mode_writes_each_image_at_its_bucket_size(tmp_path):
    src = tmp_path / "src"
    picture(src / "wide.jpg", size=(600, 400))
    picture(src / "tall.png", size=(400, 600), seed=1)
    settings = PreprocessSettings.from_schema(size=(256, 256), mode="bucket", bucket_min_side=128, bucket_max_side=512)
    _, manifest, _ = run(src, tmp_path / "out", settings)
    rows = manifest.set_index("output")
    assert rows.bucket["wide.png"] == "320x192" and rows.bucket["tall.png"] == "192x320"
    assert Image.open(tmp_path / "out" / "wide.png").size == (320, 192) and (rows.out_width["wide.png"], rows.out_height["wide.png"]) == (320, 192)


def test_focal_debug_image_and_flip_are_recorded(tmp_path):
    src = tmp_path / "src"
    picture(src / "a.png", size=(160, 96))
    settings = PreprocessSettings.from_schema(size=(64, 64), mode="focal", focal_debug=True, flip=True)
    _, manifest, _ = run(src, tmp_path / "out", settings)
    assert Image.open(tmp_path / "out" / "focal_debug" / "a.jpg").size == (107, 64)
    assert list(manifest.flip) == [True]
    assert len(list((tmp_path / "out").glob("*.png"))) == 1  # flipping is cache_latents' job: no mirrored PNG


def test_only_new_images_are_processed_and_removed_ones_leave(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    for index in range(6):
        picture(src / f"img{index}.png", seed=index)
    assert run(src, out)[0].processed == 6
    picture(src / "new.png", seed=99)
    summary, manifest, _ = run(src, out)
    assert (summary.processed, summary.reused, len(manifest)) == (1, 6, 7)
    (src / "img0.png").unlink()
    summary, manifest, _ = run(src, out)
    assert (summary.processed, summary.reused) == (0, 6) and not (out / "img0.png").exists()
    for path in out.glob("*.png"):  # Snakemake removes outputs before a rerun; the cache outlives them
        path.unlink()
    summary, _, _ = run(src, out, PreprocessSettings.from_schema(size=(64, 64), flip=True))
    assert summary.processed == 0 and len(list(out.glob("*.png"))) == 6
    assert run(src, out, PreprocessSettings.from_schema(size=(128, 128)))[0].processed == 6


def test_prune_keeps_only_the_cache_entries_the_current_images_and_settings_use(tmp_path):
    src, out, cache = tmp_path / "src", tmp_path / "out", tmp_path / "cache"
    for index in range(4):
        picture(src / f"img{index}.png", seed=index)
    run(src, out)
    run(src, out, PreprocessSettings.from_schema(size=(128, 128)))  # another settings key: a second set of entries
    (src / "img0.png").unlink()
    before = sum(1 for p in cache.rglob("*") if p.is_file())
    summary, manifest, _ = run(src, out, PreprocessSettings.from_schema(size=(64, 64), prune=True))
    assert summary.pruned_files == before - 2 * 3 and summary.pruned_bytes > 0  # 3 images left, a record and a PNG each
    assert "unused cache files pruned" in summary.line()
    assert [p.name for p in cache.iterdir()] == [PreprocessSettings.from_schema(size=(64, 64)).cache_key()]
    for name in manifest.output:  # the outputs are whole (hard links keep their bytes)
        assert Image.open(out / name).size == (64, 64)
    again, _, _ = run(src, out, PreprocessSettings.from_schema(size=(64, 64), prune=True))
    assert (again.processed, again.reused, again.pruned_files) == (0, 3, 0)  # nothing in use was pruned


def test_parallel_workers_give_the_same_result(tmp_path):
    src = tmp_path / "src"
    for index in range(5):
        picture(src / f"img{index}.png", size=(120, 90), seed=index)
    (src / "broken.png").write_bytes(bad_file_bytes("truncated"))
    _, serial, serial_skips = run(src, tmp_path / "one", workers=1)
    _, parallel, parallel_skips = run(src, tmp_path / "two", workers=2)
    assert serial.drop(columns="source").equals(parallel.drop(columns="source")) and serial_skips == parallel_skips
    for name in serial.output:
        assert Image.open(tmp_path / "one" / name).tobytes() == Image.open(tmp_path / "two" / name).tobytes()


def test_a_folder_with_no_usable_image_stops_with_a_clear_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable image.*1 file skipped"):
        preprocess_folder(tmp_path / "src", tmp_path / "out", SMALL)
    assert "0 bytes" in (tmp_path / "out" / "skipped.csv").read_text()


def test_cli_runs_in_parallel_and_prints_one_summary_line(tmp_path):
    src = tmp_path / "src"
    picture(src / "a.png")
    picture(src / "b.jpg", seed=1)
    (src / "c.png").write_bytes(b"")
    settings = json.dumps({"out_dir": str(tmp_path / "out"), "preprocess": {"size": 64, "mode": "focal"}})
    command = [sys.executable, "-m", "stages.preprocess", "--settings", settings, "--images", str(src), "--threads", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "preprocess: 2 kept, 1 skipped, 0 duplicates, 0 near-duplicate pairs (3 processed, 0 from cache)" in result.stdout
    assert (tmp_path / "out" / "cache" / "preprocess").is_dir()
    (src / "a.png").unlink(), (src / "b.jpg").unlink()
    failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "no usable image" in failed.stderr

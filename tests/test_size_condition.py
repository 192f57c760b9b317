"""SDXL size conditioning (add_time_ids) per training image, from the preprocess manifest through cache_latents to training."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages.cache_latents.encode import MANIFEST_COLUMNS, cache_latents
from stages.cache_latents.settings import CacheSettings
from stages.common.errors import InputError
from stages.common.latents import LatentExample, load_examples
from stages.common.size_condition import size_condition, size_condition_of_row
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder
from test_cache_latents import vae, write_image, write_preprocessed  # noqa: F401 (vae is a fixture)

CPU = CacheSettings.from_schema(device="cpu")


# (original_height, original_width, crop_top, crop_left, target_height, target_width), worked out by hand

def test_a_center_crop_is_measured_in_the_source_resized_so_the_crop_has_the_target_size():
    # 300x200 → box 200 wide at x=50; scale 64/200 = 0.32; left 50·0.32 = 16
    assert size_condition(300, 200, "50 0 250 200", "", 64, 64) == (200, 300, 0, 16, 64, 64)
    # resized source is 96 wide: the mirrored crop starts at 96 - 16 - 64 = 16
    assert size_condition(300, 200, "50 0 250 200", "", 64, 64, flipped=True) == (200, 300, 0, 16, 64, 64)


def test_an_off_centre_crop_mirrors_when_flipped():
    # focal-like box at x=30: 30·0.32 = 9.6 → 10; mirrored: 96 - 10 - 64 = 22
    assert size_condition(300, 200, "30 0 230 200", "", 64, 64) == (200, 300, 0, 10, 64, 64)
    assert size_condition(300, 200, "30 0 230 200", "", 64, 64, flipped=True) == (200, 300, 0, 22, 64, 64)
    # a portrait's crop moves down: 200x300, box at y=40, scale 0.32 → top 12.8 → 13; nothing to mirror across
    assert size_condition(200, 300, "0 40 200 240", "", 64, 64, flipped=True) == (300, 200, 13, 0, 64, 64)


def test_pad_mode_crops_nothing():
    assert size_condition(300, 200, "0 0 300 200", "", 64, 64) == (200, 300, 0, 0, 64, 64)
    assert size_condition(300, 200, "0 0 300 200", "", 64, 64, flipped=True) == (200, 300, 0, 0, 64, 64)


def test_a_bucket_follows_kohyas_get_crop_ltrb():
    # 365x240 (ar 1.5208) in 80x48 (ar 1.667): fitted 73.0x48, left (80 - 73) // 2 = 3, right 76
    assert size_condition(365, 240, "2.5 0 362.5 240", "80x48", 80, 48) == (240, 365, 0, 3, 48, 80)
    # kohya's flip: left = 80 - right = 4
    assert size_condition(365, 240, "2.5 0 362.5 240", "80x48", 80, 48, flipped=True) == (240, 365, 0, 4, 48, 80)
    # 200x300 (ar 0.667) in 48x80 (ar 0.6): fitted 48x72, top (80 - 72) // 2 = 4; flipped left 48 - 48 = 0
    assert size_condition(200, 300, "0 25 200 275", "48x80", 48, 80) == (300, 200, 4, 0, 80, 48)
    assert size_condition(200, 300, "0 25 200 275", "48x80", 48, 80, flipped=True) == (300, 200, 4, 0, 80, 48)


def test_an_old_manifest_row_gives_none_and_a_malformed_one_says_which_value():
    assert size_condition_of_row({"output": "a.png", "out_width": "64", "out_height": "64"}) is None
    assert size_condition_of_row({"width": "300", "height": "200", "crop_box": "", "bucket": "", "out_width": "64", "out_height": "64"}) is None
    with pytest.raises(ValueError, match="crop_box 'fifty 0 250 200'"):
        size_condition_of_row({"width": "300", "height": "200", "crop_box": "fifty 0 250 200", "bucket": "", "out_width": "64", "out_height": "64"})
    with pytest.raises(ValueError, match="bucket '80by48'"):
        size_condition(365, 240, "0 0 1 1", "80by48", 80, 48)


def _prepare(tmp_path: Path, **settings) -> tuple[Path, pd.DataFrame]:
    source = tmp_path / "src"
    source.mkdir()
    write_image(source, "wide.png", (300, 200), seed=1)
    write_image(source, "tall.png", (200, 300), seed=2)
    pre = tmp_path / "pre"
    preprocess_folder(source, pre, PreprocessSettings.from_schema(flip=True, **settings), cache_dir=tmp_path / "pcache")
    manifest = pd.read_csv(pre / "manifest.csv", keep_default_na=False, dtype=str).set_index("output")
    captions = tmp_path / "cap"
    captions.mkdir()
    pd.DataFrame({"image": list(manifest.index), "caption": "a picture"}).to_csv(captions / "captions.csv", index=False)
    return pre, manifest


def _conditions(vae, tmp_path: Path, pre: Path) -> dict[tuple[str, bool], tuple]:
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU, flip=True)
    table = pd.read_csv(tmp_path / "lat" / "manifest.csv")
    assert list(table.columns) == MANIFEST_COLUMNS
    examples = load_examples(tmp_path / "lat", tmp_path / "cap")
    return {(e.image, flip): e.size_condition for e, flip in zip(examples, table["flip"])}


def test_center_mode_conditions_reach_training_from_the_crop_box(vae, tmp_path):
    pre, manifest = _prepare(tmp_path, size=64, mode="center")
    # the crops the expectations below are worked out from
    assert manifest.loc["wide.png", ["width", "height", "crop_box", "bucket", "out_width", "out_height"]].tolist() == ["300", "200", "50 0 250 200", "", "64", "64"]
    assert manifest.loc["tall.png", ["width", "height", "crop_box", "bucket", "out_width", "out_height"]].tolist() == ["200", "300", "0 50 200 250", "", "64", "64"]
    # wide: scale 64/200, left 16, mirrored 96 - 16 - 64 = 16; tall: top 16, mirrored 64 - 0 - 64 = 0
    assert _conditions(vae, tmp_path, pre) == {
        ("wide.png", False): (200, 300, 0, 16, 64, 64), ("wide.png", True): (200, 300, 0, 16, 64, 64),
        ("tall.png", False): (300, 200, 16, 0, 64, 64), ("tall.png", True): (300, 200, 16, 0, 64, 64),
    }


def test_bucket_mode_conditions_reach_training_by_kohyas_rule(vae, tmp_path):
    pre, manifest = _prepare(tmp_path, size=96, mode="bucket", bucket_min_side=64, bucket_max_side=160, bucket_step=16)
    assert manifest.loc["wide.png", ["width", "height", "bucket", "out_width", "out_height"]].tolist() == ["300", "200", "112x80", "112", "80"]
    assert manifest.loc["tall.png", ["width", "height", "bucket", "out_width", "out_height"]].tolist() == ["200", "300", "80x112", "80", "112"]
    # wide 300x200 in 112x80: fitted 112x74.67, top (80 - 74.67) // 2 = 2, right 112 → mirrored left 0
    # tall 200x300 in 80x112: fitted 74.67x112, left (80 - 74.67) // 2 = 2, right 76.67 → mirrored left int(3.33) = 3
    assert _conditions(vae, tmp_path, pre) == {
        ("wide.png", False): (200, 300, 2, 0, 80, 112), ("wide.png", True): (200, 300, 2, 0, 80, 112),
        ("tall.png", False): (300, 200, 0, 2, 112, 80), ("tall.png", True): (300, 200, 0, 3, 112, 80),
    }


def test_an_older_preprocess_manifest_leaves_the_condition_unknown(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64)})  # no width/height/crop_box/bucket columns
    (tmp_path / "cap").mkdir()
    pd.DataFrame({"image": ["a.png"], "caption": ["x"]}).to_csv(tmp_path / "cap" / "captions.csv", index=False)
    cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)
    row = pd.read_csv(tmp_path / "lat" / "manifest.csv", keep_default_na=False).iloc[0]
    assert [row[c] for c in ("original_height", "original_width", "crop_top", "crop_left")] == ["", "", "", ""]
    assert [e.size_condition for e in load_examples(tmp_path / "lat", tmp_path / "cap")] == [None]
    assert LatentExample("t.png", torch.zeros(4, 8, 8), torch.zeros(4, 8, 8)).size_condition is None


def test_a_malformed_crop_box_is_named_with_the_manifest_and_image(vae, tmp_path):
    pre = write_preprocessed(tmp_path / "pre", {"a.png": (64, 64)})
    manifest = pd.read_csv(pre / "manifest.csv")
    manifest = manifest.assign(width=300, height=200, crop_box="50 0 250", bucket="")
    manifest.to_csv(pre / "manifest.csv", index=False)
    with pytest.raises(InputError, match=r"manifest\.csv, the row of a\.png: crop_box '50 0 250' .*rerun the preprocess stage"):
        cache_latents(pre, tmp_path / "lat", tmp_path / "store", vae, "v", settings=CPU)

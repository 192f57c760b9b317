"""The WD14-style tagger path on a tiny ONNX tagger the tests build: colour steers each tag's score."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from stages.caption import tagging
from stages.caption.captions import write_captions
from stages.caption.settings import CaptionSettings
from stages.caption.tagger_model import open_tagger, prepare_image
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder

# name, category (0 general, 4 character, 9 rating), weights on the image's mean (B, G, R) / 255, bias.
# score = sigmoid(w · mean + b): a solid colour sets each score, e.g. R=136 → red tags at 0.60.
TAGS = [
    ("general", 9, (0, 0, 0), 0.0),        # 0.50 always
    ("sensitive", 9, (0, 0, 4), -2.0),     # 0.88 on red, 0.12 without
    ("questionable", 9, (0, 0, 0), -3.0),
    ("explicit", 9, (0, 0, 0), -4.0),
    ("red_background", 0, (0, 0, 12), -6.0),
    ("blue_sky", 0, (12, 0, 0), -6.0),
    ("1girl", 0, (0, 0, 0), 1.0),          # 0.73 always
    ("hat_(object)", 0, (0, 0, 0), 0.4055),  # 0.60 always
    ("^_^", 0, (0, 0, 0), 0.2),            # 0.55 always
    ("solo", 0, (0, 0, 0), 2.0),           # 0.88 always
    ("hero_(series)", 4, (0, 0, 12), -6.0),  # a character tag that follows red
    ("villain", 4, (12, 0, 0), -6.0),      # a character tag that follows blue
]
RED, BLUE, BLACK, MID_RED = (255, 0, 0), (0, 0, 255), (0, 0, 0), (136, 0, 0)


def build_tiny_tagger(folder: Path, side: int = 32, tags=TAGS, batch: int | str = "N", extra_tags: int = 0) -> Path:
    """model.onnx (NHWC float [batch, side, side, 3] → sigmoid scores) and a matching selected_tags.csv."""
    weights = np.array([t[2] for t in tags], dtype=np.float32).T / 255.0  # [3, tags]
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),  # [batch, 3] in B, G, R order
            helper.make_node("MatMul", ["mean", "weights"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_tagger",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(tags)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    rows = [{"tag_id": i, "name": name, "category": category, "count": 1000 - i} for i, (name, category, _, _) in enumerate(tags)]
    rows += [{"tag_id": 900 + i, "name": f"extra_{i}", "category": 0, "count": 1} for i in range(extra_tags)]
    pd.DataFrame(rows).to_csv(folder / "selected_tags.csv", index=False)
    return folder / "model.onnx"


def make_dataset(folder: Path, colours: dict[str, tuple[int, int, int]], sidecars: dict[str, str] | None = None) -> Path:
    """Solid-colour images (and sidecars) run through the real preprocess stage; returns the preprocess folder."""
    source = folder / "source"
    source.mkdir(parents=True, exist_ok=True)
    for index, (name, colour) in enumerate(colours.items()):
        image = Image.new("RGB", (64, 64), colour)
        image.putpixel((0, 0), tuple((c + index + 1) % 256 for c in colour))  # one odd pixel: preprocess drops identical files
        image.save(source / name)
    for name, text in (sidecars or {}).items():
        (source / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    preprocess_folder(source, folder / "preprocess", PreprocessSettings.from_schema(size=(64, 64)))
    return folder / "preprocess"


def tagger_settings(model: Path, methods=("tagger",), **tagger) -> CaptionSettings:
    return CaptionSettings.from_section({"method": list(methods), "tagger": {"model": str(model), **tagger}})


def caption_of(table: pd.DataFrame, stem: str) -> str:
    return table.set_index("image").caption[f"{stem}.png"]


@pytest.fixture
def tagger(tmp_path) -> Path:
    return build_tiny_tagger(tmp_path / "tagger")


def run(tmp_path, settings, colours, sidecars=None):
    preprocess = make_dataset(tmp_path / "data", colours, sidecars)
    return write_captions(preprocess, tmp_path / "out" / "caption", settings, tmp_path / "out" / "cache" / "tagger")


def test_thresholds_apply_per_category(tmp_path, tagger):
    table = run(tmp_path, tagger_settings(tagger, general_threshold=0.35, character_threshold=0.85), {"mid.png": MID_RED, "red.png": RED}).table
    mid, red = caption_of(table, "mid").split(", "), caption_of(table, "red").split(", ")
    assert "red background" in mid and "hero (series)" not in mid  # both score 0.60: general passes 0.35, character fails 0.85
    assert "red background" in red and "hero (series)" in red  # both score 0.9975
    assert "blue sky" not in red and "villain" not in red
    lowered = write_captions(tmp_path / "data" / "preprocess", tmp_path / "out" / "caption",
                             tagger_settings(tagger, character_threshold=0.5), tmp_path / "out" / "cache" / "tagger").table
    assert "hero (series)" in caption_of(lowered, "mid").split(", ")


def test_colour_reaches_the_model_as_bgr_float_nhwc(tmp_path, tagger):
    table = run(tmp_path, tagger_settings(tagger), {"red.png": RED, "blue.png": BLUE}).table
    assert "red background" in caption_of(table, "red") and "blue sky" not in caption_of(table, "red")
    assert "blue sky" in caption_of(table, "blue") and "red background" not in caption_of(table, "blue")


def test_ratings_are_left_out_unless_asked(tmp_path, tagger):
    colours = {"red.png": RED, "black.png": BLACK}
    excluded = run(tmp_path, tagger_settings(tagger), colours).table
    assert not {"general", "sensitive", "questionable", "explicit"} & set(caption_of(excluded, "red").split(", "))
    preprocess, out, store = tmp_path / "data" / "preprocess", tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"
    first = write_captions(preprocess, out, tagger_settings(tagger, rating="first"), store).table
    assert caption_of(first, "red").startswith("sensitive, ")  # 0.88 beats general's 0.50
    assert caption_of(first, "black").startswith("general, ")  # sensitive 0.12 < general 0.50
    last = write_captions(preprocess, out, tagger_settings(tagger, rating="last"), store).table
    assert caption_of(last, "red").endswith(", sensitive")


def test_order_exclusions_escaping_underscores_and_max_tags(tmp_path, tagger):
    colours = {"red.png": RED}
    by_confidence = caption_of(run(tmp_path, tagger_settings(tagger), colours).table, "red")
    assert by_confidence == "hero (series), red background, solo, 1girl, hat (object), ^_^"  # equal scores: by name
    preprocess, out, store = tmp_path / "data" / "preprocess", tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"

    def caption(**options):
        return caption_of(write_captions(preprocess, out, tagger_settings(tagger, **options), store).table, "red")

    assert caption(sort="alphabetical") == "1girl, ^_^, hat (object), hero (series), red background, solo"
    assert caption(exclude=["red_background", "1girl"]) == "hero (series), solo, hat (object), ^_^"
    assert caption(exclude=["hat (object)"]) == "hero (series), red background, solo, 1girl, ^_^"
    assert caption(escape_brackets=True) == r"hero \(series\), red background, solo, 1girl, hat \(object\), ^_^"
    assert caption(replace_underscores=False) == "hero_(series), red_background, solo, 1girl, hat_(object), ^_^"
    assert caption(max_tags=2) == "hero (series), red background"
    assert caption(always_first=["1girl", "blue_sky"], max_tags=3) == "1girl, hero (series), red background"
    assert caption(prefix=["mychar"], always_first=["solo"], max_tags=1, separator=" | ") == "mychar | solo"


def test_fallback_chain_and_existing_caption_actions(tmp_path, tagger):
    colours = {"red.png": RED, "01-dark night.png": BLACK, "kept.png": BLACK}
    sidecars = {"kept.png": "my own words", "red.png": "a red square"}
    chain = ["existing", "tagger", "filename"]
    table = run(tmp_path, tagger_settings(tagger, methods=chain, general_threshold=0.95), colours, sidecars).table
    sources = table.set_index("image").source
    assert caption_of(table, "kept") == "my own words" and sources["kept.png"] == "existing"
    assert caption_of(table, "red") == "a red square" and sources["red.png"] == "existing"
    assert caption_of(table, "01-dark_night") == "dark night" and sources["01-dark_night.png"] == "filename"  # black: no tag reaches 0.95
    tags = pd.read_csv(tmp_path / "out" / "caption" / "tags.csv", keep_default_na=False)
    assert set(tags.image) == {"01-dark_night.png"}  # the tagger ran only where the chain reached it

    preprocess, out, store = tmp_path / "data" / "preprocess", tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"

    def red_caption(action):
        settings = CaptionSettings.from_section({"method": ["tagger", "filename"], "existing_action": action,
                                                 "tagger": {"model": str(tagger), "general_threshold": 0.95, "character_threshold": 0.95}})
        result = write_captions(preprocess, out, settings, store).table
        return caption_of(result, "red"), result.set_index("image").source["red.png"]

    assert red_caption("ignore") == ("hero (series), red background", "tagger")
    assert red_caption("copy") == ("a red square", "existing")
    assert red_caption("prepend") == ("a red square, hero (series), red background", "existing+tagger")
    assert red_caption("append") == ("hero (series), red background, a red square", "tagger+existing")


def test_tags_csv_holds_scores_and_reruns_are_identical(tmp_path, tagger):
    run(tmp_path, tagger_settings(tagger, scores_min=0.0), {"red.png": RED, "blue.png": BLUE})
    out = tmp_path / "out" / "caption"
    tags = pd.read_csv(out / "tags.csv", keep_default_na=False)
    assert list(tags.columns) == ["image", "method", "tag", "category", "score", "used"] and (tags.method == "tagger").all()
    assert len(tags) == 2 * len(TAGS)  # scores_min 0: every tag of every image
    red = tags[tags.image == "red.png"].set_index("tag")
    assert red.score["red_background"] == pytest.approx(1 / (1 + np.exp(-6)), abs=1e-5)
    assert red.category["hero_(series)"] == "character" and red.category["sensitive"] == "rating"
    assert red.used["red_background"] and not red.used["blue_sky"] and not red.used["sensitive"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_captions(tmp_path / "data" / "preprocess", out, tagger_settings(tagger, scores_min=0.0), tmp_path / "out" / "cache" / "tagger")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    default_floor = write_captions(tmp_path / "data" / "preprocess", out, tagger_settings(tagger), tmp_path / "out" / "cache" / "tagger")
    floored = pd.read_csv(out / "tags.csv", keep_default_na=False)
    assert default_floor.tagged == 0 and (floored.score.ge(0.01) | floored.category.eq("rating")).all() and len(floored) < len(tags)


def test_a_changed_threshold_recaptions_from_cached_scores(tmp_path, tagger, monkeypatch):
    first = run(tmp_path, tagger_settings(tagger), {"red.png": RED, "blue.png": BLUE})
    assert (first.tagged, first.tags_reused) == (2, 0)
    assert len(list((tmp_path / "out" / "cache" / "tagger").rglob("*.npy"))) == 2

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not run when every score is cached")

    monkeypatch.setattr(tagging, "open_tagger", no_model)
    again = write_captions(tmp_path / "data" / "preprocess", tmp_path / "out" / "caption", tagger_settings(tagger, general_threshold=0.8),
                           tmp_path / "out" / "cache" / "tagger")
    assert (again.tagged, again.tags_reused) == (0, 2)
    assert caption_of(again.table, "red") == "hero (series), red background, solo"
    monkeypatch.undo()
    Image.new("RGB", (64, 64), MID_RED).save(tmp_path / "data" / "source" / "added.png")
    preprocess_folder(tmp_path / "data" / "source", tmp_path / "data" / "preprocess", PreprocessSettings.from_schema(size=(64, 64)))
    grown = write_captions(tmp_path / "data" / "preprocess", tmp_path / "out" / "caption", tagger_settings(tagger), tmp_path / "out" / "cache" / "tagger")
    assert (grown.tagged, grown.tags_reused) == (1, 2)  # only the new image goes through the model


def test_input_size_is_read_from_the_model_and_fixed_batches_work(tmp_path):
    model = build_tiny_tagger(tmp_path / "t24", side=24, batch=1)
    opened = open_tagger(model)
    assert opened.side == 24 and opened.fixed_batch == 1 and opened.output_width == len(TAGS)
    table = run(tmp_path, tagger_settings(model, batch_size=4), {"a.png": RED, "b.png": BLUE, "c.png": RED}).table
    assert "red background" in caption_of(table, "c") and "blue sky" in caption_of(table, "b")


def test_prepare_image_pads_on_white_resizes_and_swaps_to_bgr():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    array = prepare_image(wide, 20)
    assert array.shape == (20, 20, 3) and array.dtype == np.float32
    assert array[10, 10].tolist() == [0.0, 0.0, 255.0]  # red in BGR order
    assert array[0, 10].tolist() == [255.0, 255.0, 255.0] and array[-1, 10].tolist() == [255.0, 255.0, 255.0]  # padding
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert prepare_image(transparent, 8).min() == 255.0  # transparency composited on white


def test_clear_errors_for_missing_files_a_mismatched_model_and_unreadable_images(tmp_path, tagger):
    preprocess = make_dataset(tmp_path / "data", {"red.png": RED})
    out, store = tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"
    with pytest.raises(ValueError, match="caption.tagger.model: not set"):
        write_captions(preprocess, out, CaptionSettings.from_section({"method": "tagger"}), store)
    with pytest.raises(FileNotFoundError, match=r"caption.tagger.model: .*nowhere.onnx does not exist"):
        write_captions(preprocess, out, tagger_settings(tmp_path / "nowhere.onnx"), store)
    with pytest.raises(FileNotFoundError, match=r"caption.tagger.tags: .*missing.csv does not exist"):
        write_captions(preprocess, out, tagger_settings(tagger, tags=str(tmp_path / "missing.csv")), store)
    wider = build_tiny_tagger(tmp_path / "wider", extra_tags=3)
    with pytest.raises(ValueError, match=rf"gives {len(TAGS)} scores per image but .*selected_tags.csv lists {len(TAGS) + 3} tags"):
        write_captions(preprocess, out, tagger_settings(wider), store)
    not_a_model = tmp_path / "broken" / "model.onnx"
    not_a_model.parent.mkdir()
    not_a_model.write_bytes(b"not a model")
    (tmp_path / "broken" / "selected_tags.csv").write_bytes((tmp_path / "tagger" / "selected_tags.csv").read_bytes())
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        write_captions(preprocess, out, tagger_settings(not_a_model), store)
    (preprocess / "red.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match=r"caption.tagger: cannot read .*red.png"):
        write_captions(preprocess, out, tagger_settings(tagger), store)

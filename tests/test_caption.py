import json
import subprocess
import sys

import pandas as pd
import pytest

from stages.caption.captions import caption_from_filename, combine_with_sidecar, first_method_with_text, write_captions
from stages.caption.settings import CaptionSettings, FilenameRule
from stages.common.workflow import tagger_inputs
from stages.common.config import ConfigError


@pytest.mark.parametrize(
    "name, caption",
    [
        ("000001-1-a man in suit.png", "a man in suit"),  # AUTOMATIC1111's own example
        ("12-red_toy.jpg", "red_toy"),  # the rest of the name keeps its format
        ("2023-05-01 sunset.jpg", "sunset"),
        ("plain name.webp", "plain name"),
        ("0001.png", ""),
    ],
)
def test_filename_rule_matches_automatic1111(name, caption):
    assert caption_from_filename(name) == caption


def test_filename_word_regex_and_join_string():
    assert caption_from_filename("000001-1-a man in suit.png", FilenameRule(word_regex=r"\w+", join=", ")) == "a, man, in, suit"
    assert caption_from_filename("07-red_toy, blue_ball.png", FilenameRule(word_regex=r"[^_,\s]+", join=" ")) == "red toy blue ball"
    with pytest.raises(ConfigError, match="caption.filename.word_regex"):
        FilenameRule(word_regex="(unclosed", join=" ")


def test_the_first_method_with_text_wins_and_none_ends_the_list():
    texts = {"existing": "", "filename": "from name"}
    assert first_method_with_text(("existing", "filename"), texts) == "filename"
    assert first_method_with_text(("existing", "none", "filename"), texts) == "none"
    assert first_method_with_text(("existing", "tagger", "filename"), texts) is None  # the tagger has to run first
    assert first_method_with_text(("existing",), texts) == "none"


@pytest.mark.parametrize(
    "action, expected",
    [("ignore", ("tags", "tagger")), ("copy", ("sidecar", "existing")),
     ("prepend", ("sidecar, tags", "existing+tagger")), ("append", ("tags, sidecar", "tagger+existing"))],
)
def test_existing_caption_actions(action, expected):
    assert combine_with_sidecar("tagger", "tags", "sidecar", action) == expected
    assert combine_with_sidecar("tagger", "tags", "", action) == ("tags", "tagger")  # no sidecar: nothing to combine


def test_existing_sidecars_become_caption_files(demo_prepared, tmp_path):
    table = write_captions(demo_prepared / "preprocess", tmp_path / "caption", "existing").table
    assert len(table) == 8 and (table.source == "existing").all()
    assert (tmp_path / "caption" / "toy_00.txt").read_text(encoding="utf-8") == "a red toy on a green background"
    written = pd.read_csv(tmp_path / "caption" / "captions.csv")
    assert list(written.columns) == ["image", "caption_file", "caption", "source"] and written.caption.str.startswith("a red toy").all()
    assert not (tmp_path / "caption" / "tags.csv").exists()  # no tagger ran


def test_filename_fallback_and_stale_captions(demo_prepared, tmp_path):
    out = tmp_path / "caption"
    (out).mkdir()
    (out / "gone.txt").write_text("an image removed since", encoding="utf-8")
    table = write_captions(demo_prepared / "preprocess", out, ["filename", "existing"]).table
    assert table.set_index("image").caption["toy_03.png"] == "toy_03" and (table.source == "filename").all()
    assert not (out / "gone.txt").exists()
    settings = CaptionSettings.from_section({"method": "filename", "existing_action": "append", "filename": {"word_regex": "[a-z]+"}})
    combined = write_captions(demo_prepared / "preprocess", out, settings).table.set_index("image")
    assert combined.caption["toy_00.png"] == "toy, a red toy on a green background" and combined.source["toy_00.png"] == "filename+existing"


def test_bad_methods_are_refused_naming_the_key(demo_prepared, tmp_path):
    with pytest.raises(ValueError, match="caption.method: 'bogus' is not allowed"):
        write_captions(demo_prepared / "preprocess", tmp_path / "c", "bogus")
    with pytest.raises(ValueError, match=r"caption.method.1: 'tagr' is not allowed; choose one of: existing, filename, tagger, deepbooru, blip, combine, none"):
        CaptionSettings.from_section({"method": ["existing", "tagr"]})
    with pytest.raises(ValueError, match="caption.existing_action"):
        CaptionSettings.from_section({"existing_action": "merge"})


def test_tagger_files_are_workflow_inputs_only_when_used(tmp_path):
    assert tagger_inputs({"method": "existing"}) == []
    with pytest.raises(FileNotFoundError, match="caption.tagger.model"):
        tagger_inputs({"method": ["existing", "tagger"], "tagger": {"model": str(tmp_path / "model.onnx")}})
    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
    assert tagger_inputs({"method": ["tagger"], "tagger": {"model": str(tmp_path / "model.onnx")}}) == [
        str(tmp_path / "model.onnx"), str(tmp_path / "selected_tags.csv")]


def test_stage_cli_with_settings_as_snakemake_passes_them(demo_prepared, tmp_path):
    settings = json.dumps({"caption": {"method": ["existing", "filename"]}})
    result = subprocess.run([sys.executable, "-m", "stages.caption", "--settings", settings, "--preprocessed", str(demo_prepared / "preprocess"),
                             "--out", str(tmp_path / "caption")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "8 captions written" in result.stdout and "8 existing" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "stages.caption", "--settings", json.dumps({"caption": {"method": "tagger"}}), "--preprocessed",
                          str(demo_prepared / "preprocess"), "--out", str(tmp_path / "c2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "caption.tagger.model: not set" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

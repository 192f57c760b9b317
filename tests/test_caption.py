import pandas as pd
import pytest

from stages.caption.captions import caption_from_filename, write_captions


@pytest.mark.parametrize(
    "name, caption",
    [("000001-1-a man in suit.png", "a man in suit"), ("12-red_toy.jpg", "red toy"), ("plain name.webp", "plain name")],
)
def test_filename_rule_matches_automatic1111(name, caption):
    assert caption_from_filename(name) == caption


def test_existing_sidecars_become_caption_files(demo_prepared, tmp_path):
    table = write_captions(demo_prepared / "preprocess", tmp_path / "caption", "existing")
    assert len(table) == 8 and (table.source == "sidecar").all()
    assert (tmp_path / "caption" / "toy_00.txt").read_text(encoding="utf-8") == "a red toy on a green background"
    assert pd.read_csv(tmp_path / "caption" / "captions.csv").caption.str.startswith("a red toy").all()


def test_unknown_method_is_refused(demo_prepared, tmp_path):
    with pytest.raises(ValueError, match="caption.method"):
        write_captions(demo_prepared / "preprocess", tmp_path / "c", "bogus")

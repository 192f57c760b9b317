"""CLIP likeness and editability on a tiny random-weight CLIP model the tests save in transformers' format."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages.common.clip_vocab import write_tokenizer_files
from stages.common.errors import InputError, MissingInput
from stages.evaluate.similarity import ClipScorer, plot_tradeoff, similarity_table, summarise, tradeoff_points

from tiny_clip import PROJECTION  # the size of the clip_folder fixture (conftest.py)


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return ClipScorer.load(clip_folder)


def picture(seed: int, size: int = 48) -> Image.Image:
    """A blocky random picture, larger than the model's input so the processor really resizes it."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.NEAREST)


def copy_of(clip_folder, tmp_path, *remove):
    target = tmp_path / "clip"
    shutil.copytree(clip_folder, target)
    for name in remove:
        (target / name).unlink()
    return target


def test_features_are_unit_vectors_and_do_not_depend_on_the_batch(scorer):
    images = [picture(seed) for seed in range(5)]
    features = scorer.image_features(images)
    assert features.shape == (5, PROJECTION)
    assert torch.allclose(features.norm(dim=-1), torch.ones(5), atol=1e-5)
    texts = ["a toy", "a red toy on a beach at sunset, watercolour", "toy"]
    text = scorer.text_features(texts)
    assert text.shape == (3, PROJECTION) and torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(text[0], text[2], atol=1e-3)  # different words, different vectors

    scorer.batch_size = 2  # batches of 2, 2, 1; texts padded to different lengths
    try:
        assert torch.allclose(scorer.image_features(images), features, atol=1e-5)
        assert torch.allclose(torch.cat([scorer.text_features([t]) for t in texts]), text, atol=1e-5)
    finally:
        scorer.batch_size = 16


def test_an_image_from_the_training_set_is_scored_most_like_it(scorer):
    training = [picture(1), picture(2)]
    cells = [
        {"column": "without the embedding", "step": None, "prompt": "a toy on a beach", "seed": 7, "image": picture(9)},
        {"column": "step 20", "step": 20, "prompt": "a toy on a beach", "seed": 7, "image": training[0].copy()},
        {"column": "step 20", "step": 20, "prompt": "a toy in the snow", "seed": 7, "image": training[0].copy()},
    ]
    table = similarity_table(scorer, cells, training)
    assert table.columns.tolist() == ["column", "step", "prompt", "seed", "likeness", "editability"]
    assert len(table) == 3 and table.column.tolist() == ["without the embedding", "step 20", "step 20"]
    assert pd.isna(table.step[0]) and table.step[1:].tolist() == [20, 20] and table.seed.tolist() == [7, 7, 7]
    assert table[["likeness", "editability"]].abs().le(1).all().all()
    assert table.likeness[1] > table.likeness[0]  # a copy of a training image beats an unrelated one
    assert table.likeness[1] == pytest.approx(table.likeness[2])  # same image, same likeness, whatever the prompt
    assert table.editability[1] != pytest.approx(table.editability[2], abs=1e-4)  # each image is scored against its own prompt

    alone = similarity_table(scorer, cells[1:2], training[:1])
    assert alone.likeness[0] == pytest.approx(1.0, abs=1e-5)  # identical to the only training image
    expected = (scorer.image_features([training[0]]) @ scorer.text_features(["a toy on a beach"]).T).item()
    assert alone.editability[0] == pytest.approx(expected, abs=1e-5)

    with pytest.raises(InputError, match="no training images"):
        similarity_table(scorer, cells, [])


def test_summary_averages_each_column_in_the_order_first_seen():
    table = pd.DataFrame({
        "column": ["without the embedding", "step 40", "step 20", "without the embedding", "step 40", "step 20"],
        "step": pd.array([None, 40, 20, None, 40, 20], dtype="Int64"),
        "prompt": ["a", "a", "a", "b", "b", "b"], "seed": [1] * 6,
        "likeness": [0.2, 0.8, 0.5, 0.4, 0.6, 0.7], "editability": [0.3, 0.1, 0.2, 0.5, 0.1, 0.0],
    })
    summary = summarise(table)
    assert summary.columns.tolist() == ["column", "step", "likeness", "editability", "images"]
    assert summary.column.tolist() == ["without the embedding", "step 40", "step 20"]
    assert pd.isna(summary.step[0]) and summary.step[1:].tolist() == [40, 20]
    assert np.allclose(summary.likeness, [0.3, 0.7, 0.6]) and np.allclose(summary.editability, [0.4, 0.1, 0.1])
    assert summary.images.tolist() == [2, 2, 2]

    checkpoints, baseline = tradeoff_points(summary)
    assert checkpoints.step.tolist() == [20, 40]  # the line joins them in step order
    assert baseline.column.tolist() == ["without the embedding"]


def test_the_tradeoff_chart_draws_the_checkpoints_and_the_baseline(tmp_path):
    summary = pd.DataFrame({"column": ["without the embedding", "step 10", "step 20"], "step": pd.array([None, 10, 20], dtype="Int64"),
                            "likeness": [0.3, 0.5, 0.7], "editability": [0.3, 0.25, 0.15], "images": [4, 4, 4]})
    target = tmp_path / "charts" / "similarity.png"
    plot_tradeoff(summary, target)
    chart = np.asarray(Image.open(target).convert("RGB"))
    assert chart.shape == (450, 600, 3)
    colours = {tuple(pixel) for pixel in chart.reshape(-1, 3)}
    assert (31, 119, 180) in colours  # tab:blue, the checkpoints' line and points
    assert (214, 39, 40) in colours  # tab:red, the baseline's star
    assert not list(target.parent.glob("*.partial"))  # written atomically, nothing left beside it

    plot_tradeoff(summary[summary.step.notna()], target)  # no baseline column: still a chart, without the star
    assert (214, 39, 40) not in {tuple(p) for p in np.asarray(Image.open(target).convert("RGB")).reshape(-1, 3)}


def test_a_folder_with_only_vocab_and_merges_loads_the_full_vocabulary(clip_folder, tmp_path, scorer):
    folder = copy_of(clip_folder, tmp_path, "tokenizer.json", "tokenizer_config.json")
    write_tokenizer_files(folder)  # the older layout: vocab.json, merges.txt
    assert torch.allclose(ClipScorer.load(folder).text_features(["a red toy"]), scorer.text_features(["a red toy"]), atol=1e-5)


def test_load_errors_name_the_path_and_what_to_do(clip_folder, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingInput, match=r"evaluate\.clip_model: .*nowhere does not exist.*CLIPModel\.save_pretrained.*null"):
        ClipScorer.load(missing)

    text_only = copy_of(clip_folder, tmp_path)
    config = json.loads((text_only / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps(dict(config["text_config"], model_type="clip_text_model")))
    with pytest.raises(InputError, match=r"clip/config\.json describes a 'clip_text_model' model, not a CLIP model"):
        ClipScorer.load(text_only)
    shutil.rmtree(text_only)

    no_tokenizer = copy_of(clip_folder, tmp_path, "tokenizer.json")
    for name in ("vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(MissingInput, match=r"clip has no tokenizer \(tokenizer\.json, or vocab\.json and merges\.txt\)"):
        ClipScorer.load(no_tokenizer, key="evaluate.clip")
    shutil.rmtree(no_tokenizer)

    no_processor = copy_of(clip_folder, tmp_path, "preprocessor_config.json")
    with pytest.raises(MissingInput, match=r"clip has no image processor \(preprocessor_config\.json\)"):
        ClipScorer.load(no_processor)

    open_clip = tmp_path / "open_clip"
    open_clip.mkdir()
    (open_clip / "open_clip_config.json").write_text("{}")
    (open_clip / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"open_clip.*holds an open_clip model; only transformers' CLIP format is read"):
        ClipScorer.load(open_clip)

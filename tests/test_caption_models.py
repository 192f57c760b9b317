"""The deepbooru and blip caption methods, and the combine step, on models the tests build with random weights.

DeepDanbooru's file is written as AUTOMATIC1111 loads it (one torch.save dict: the network's
state dict plus its 'tags' list); BLIP's folder as transformers saves it, with a BERT
vocabulary written here. Nothing is downloaded.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages.caption import deepbooru
from stages.caption.captions import write_captions
from stages.caption.deepbooru import caption_from_deepbooru
from stages.caption.deepbooru_model import DeepDanbooruModel, deepbooru_layout, load_deepbooru, resize_and_fill
from stages.caption.score_cache import ScoreCache
from stages.caption.settings import CaptionSettings
from stages.common.errors import InputError
from stages.common.files import hash_file
from stages.common.workflow import caption_inputs
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder
from tiny_blip import WORDS, write_tiny_blip

TAGS = ["1girl", "long_hair", "solo", "rating:safe", "hat_(object)", "smile", "blue_eyes", "\\m/", "[square]_brackets",
        "short_hair", "rating:explicit", "open_mouth", "^_^", "school_uniform", "holding_(thing)", "zzz"]
COLOURS = {"red.png": (220, 30, 30), "blue.png": (20, 40, 230), "grey.png": (128, 128, 128)}


def write_deepbooru(path: Path, tags=TAGS, base: int = 4, seed: int = 0) -> Path:
    """A random-weight DeepDanbooru at 1/16 of the real width, saved in model-resnet_custom_v3.pt's layout.

    The head is scaled so the scores of a grey picture have logits of spread 2 (random weights
    alone put every score near 0.5).
    """
    torch.manual_seed(seed)
    model = DeepDanbooruModel(base, len(tags)).eval()
    with torch.no_grad():
        scores = model(torch.full((1, 512, 512, 3), 0.5))[0].double()
        model.conv(model.head).weight *= 2 / torch.logit(scores).std()
    state = model.state_dict()
    state["tags"] = list(tags)
    torch.save(state, path)
    return path


def make_dataset(folder: Path, colours=COLOURS, sidecars: dict[str, str] | None = None) -> Path:
    """Solid-colour 64 px pictures (each with one odd pixel, so none is a duplicate) through the real preprocess stage."""
    source = folder / "source"
    source.mkdir(parents=True, exist_ok=True)
    for index, (name, colour) in enumerate(colours.items()):
        image = Image.new("RGB", (64, 64), colour)
        image.putpixel((0, 0), tuple((c + index + 1) % 256 for c in colour))
        image.save(source / name)
    for name, text in (sidecars or {}).items():
        (source / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    preprocess_folder(source, folder / "preprocess", PreprocessSettings.from_schema(size=(64, 64)))
    return folder / "preprocess"


def a1111_caption(tags, scores, threshold=0.5, sort_alpha=True, use_spaces=True, escape=True, include_ranks=False, filter_tags=""):
    """What the webui's DeepDanbooru.tag_multi writes for these scores, rule by rule, with its options as arguments."""
    found = {}  # tag → score, in model order: a score below the threshold is dropped, and so is every rating:* tag
    for tag, score in zip(tags, scores):
        if not score < threshold and not tag.startswith("rating:"):
            found[tag] = score
    # alphabetical order of the raw names, or by score, highest first (ties keep model order)
    ordered = sorted(found) if sort_alpha else sorted(found, key=lambda tag: -found[tag])
    unwanted = {part.strip().replace(" ", "_") for part in filter_tags.split(",")}  # filter tags: comma-separated, spaces = underscores
    words = []
    for tag in (tag for tag in ordered if tag not in unwanted):
        word = tag.replace("_", " ") if use_spaces else tag
        word = re.sub(r"([\\()])", r"\\\1", word) if escape else word  # \ ( ) get a backslash; [ ] do not
        words.append(f"({word}:{found[tag]:.3f})" if include_ranks else word)
    return ", ".join(words)


def settings(methods, **sections) -> CaptionSettings:
    return CaptionSettings.from_section({"method": methods, **sections})


def caption_of(table: pd.DataFrame, stem: str) -> str:
    return table.set_index("image").caption[f"{stem}.png"]


@pytest.fixture(scope="module")
def deepbooru_file(tmp_path_factory) -> Path:
    return write_deepbooru(tmp_path_factory.mktemp("deepbooru") / "model-resnet_custom_v3.pt")


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("blip") / "blip-tiny")


def test_the_notes_example_formats_as_automatic1111_does():
    # the users' notes: "1.000 1girl … 0.731 blunt_bangs", threshold 0.75 keeps down to wide_sleeves; rating tags never show
    tags = ["1girl", "blush", "long_hair", "solo", "japanese_clothes", "rating:safe", "bangs", "wide_sleeves", "blunt_bangs",
            "long_sleeves", "monochrome", "hat_(object)", "\\m/"]
    scores = np.array([1.0, 0.986, 0.981, 0.98, 0.918, 0.912, 0.798, 0.795, 0.731, 0.637, 0.628, 0.81, 0.5], dtype=np.float32)

    def caption(**options):
        return caption_from_deepbooru(tags, scores, settings("deepbooru", deepbooru=options).deepbooru)[0]

    notes = dict(threshold=0.75, sort_alpha=False, use_spaces=True, escape=True)
    assert caption(**notes) == r"1girl, blush, long hair, solo, japanese clothes, hat \(object\), bangs, wide sleeves"
    # the webui's defaults: threshold 0.5, alphabetical (of the raw names), spaces, escaping; \m/ scores exactly 0.5 and stays
    assert caption() == (r"1girl, \\m/, bangs, blunt bangs, blush, hat \(object\), japanese clothes, long hair, long sleeves, "
                         "monochrome, solo, wide sleeves")
    assert caption(**notes, include_ranks=True).startswith(r"(1girl:1.000), (blush:0.986), (long hair:0.981), (solo:0.980), "
                                                           r"(japanese clothes:0.918), (hat \(object\):0.810)")
    assert caption(threshold=0.75, sort_alpha=False, use_spaces=False, escape=False) == \
        "1girl, blush, long_hair, solo, japanese_clothes, hat_(object), bangs, wide_sleeves"
    assert caption(**notes, filter_tags="long hair, solo,bangs") == caption(**notes, filter_tags=["long_hair", "solo", "bangs"]) == \
        r"1girl, blush, japanese clothes, hat \(object\), wide sleeves"
    text, used = caption_from_deepbooru(tags, scores, settings("deepbooru", deepbooru=notes).deepbooru)
    assert [tags[i] for i in used] == ["1girl", "blush", "long_hair", "solo", "japanese_clothes", "hat_(object)", "bangs", "wide_sleeves"]


OPTION_SETS = [
    {},  # the webui's defaults
    dict(threshold=0.75, sort_alpha=False, use_spaces=True, escape=True),  # the users' notes
    dict(threshold=0.3, sort_alpha=False, use_spaces=False, escape=False, include_ranks=True),
    dict(threshold=0.4, sort_alpha=True, include_ranks=True, filter_tags="1girl, long hair,smile"),
]


def test_deepbooru_captions_match_automatic1111_on_a_random_weight_model(tmp_path, deepbooru_file):
    preprocess = make_dataset(tmp_path / "data")
    out, store = tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"
    # the scores as the webui computes them: RGB, resize-and-fill to 512, [0, 1] floats NHWC, the network
    state = torch.load(deepbooru_file, weights_only=True)
    model = DeepDanbooruModel(4, len(TAGS)).eval()
    model.load_state_dict({k: v for k, v in state.items() if k != "tags"})
    expected_scores = {}
    with torch.no_grad():
        for name in COLOURS:
            with Image.open(preprocess / name) as image:
                pixels = np.array(resize_and_fill(image.convert("RGB"), 512, 512), dtype=np.float32) / 255
            expected_scores[name] = model(torch.from_numpy(pixels[None]))[0].numpy()
    spread = np.concatenate(list(expected_scores.values()))
    assert spread.min() < 0.3 and spread.max() > 0.75  # the options below all have tags on both sides of the threshold
    assert np.abs(expected_scores["red.png"] - expected_scores["blue.png"]).max() > 1e-5  # the pictures' scores differ

    for options in OPTION_SETS:
        summary = write_captions(preprocess, out, settings("deepbooru", deepbooru={"model": str(deepbooru_file), **options}), store)
        for name, scores in expected_scores.items():
            assert caption_of(summary.table, Path(name).stem) == a1111_caption(TAGS, scores, **options), options
        assert (summary.table.source == "deepbooru").all()
    assert summary.runs["deepbooru"].computed == 0 and summary.runs["deepbooru"].reused == 3  # only the first run ran the model

    cache = ScoreCache(store / "deepbooru", hash_file(deepbooru_file))
    for name, scores in expected_scores.items():  # the stage's scores are the webui's pipeline's (up to the kernels' rounding)
        np.testing.assert_allclose(cache.load(hash_file(preprocess / name)), scores, rtol=0, atol=1e-6)
    tags = pd.read_csv(out / "tags.csv", keep_default_na=False)
    assert list(tags.columns) == ["image", "method", "tag", "category", "score", "used"] and (tags.method == "deepbooru").all()
    red = tags[tags.image == "red.png"].set_index("tag")
    for index, tag in enumerate(TAGS):
        if tag in red.index:
            assert red.score[tag] == pytest.approx(expected_scores["red.png"][index], abs=2e-6)
    assert set(red.category[[t for t in red.index if t.startswith("rating:")]]) <= {"rating"}
    assert sorted(red.index[red.used]) == sorted(t for t in TAGS if t not in ("1girl", "long_hair", "smile") and not t.startswith("rating:")
                                                  and expected_scores["red.png"][TAGS.index(t)] >= 0.4)


def test_a_changed_threshold_recaptions_from_cached_scores_without_the_model(tmp_path, deepbooru_file, monkeypatch):
    preprocess = make_dataset(tmp_path / "data")
    out, store = tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"
    first = write_captions(preprocess, out, settings("deepbooru", deepbooru={"model": str(deepbooru_file)}), store)
    assert (first.runs["deepbooru"].computed, first.runs["deepbooru"].reused) == (3, 0)

    def no_model(*args, **kwargs):
        raise AssertionError("the model file must not be loaded when every score is cached")

    monkeypatch.setattr(deepbooru, "load_deepbooru", no_model)
    monkeypatch.setattr(deepbooru, "read_weights_only", no_model)
    monkeypatch.setattr(torch, "load", no_model)
    again = write_captions(preprocess, out, settings("deepbooru", deepbooru={"model": str(deepbooru_file), "threshold": 0.8,
                                                                                "sort_alpha": False, "scores_min": 0}), store)
    assert (again.runs["deepbooru"].computed, again.runs["deepbooru"].reused) == (0, 3)
    table = pd.read_csv(out / "tags.csv", keep_default_na=False)
    for name in COLOURS:
        rows = table[table.image == name].set_index("tag").score
        assert caption_of(again.table, Path(name).stem) == a1111_caption(TAGS, [rows[t] for t in TAGS], threshold=0.8, sort_alpha=False)
    assert caption_of(again.table, "red") != caption_of(first.table, "red")


def test_resize_and_fill_stretches_the_edges_into_the_bands():
    wide = Image.new("RGB", (100, 50), (0, 0, 255))
    for x in range(100):
        wide.putpixel((x, 0), (255, 0, 0))  # top row red, bottom row green
        wide.putpixel((x, 49), (0, 255, 0))
    framed = np.asarray(resize_and_fill(wide, 64, 64)).astype(int)
    fitted = np.asarray(wide.resize((64, 32), Image.LANCZOS)).astype(int)
    assert framed.shape == (64, 64, 3) and (framed[16:48] == fitted).all()  # fitted to the width (Lanczos), centred
    top, bottom = framed[:16], framed[48:]  # the bands: the edge rows stretched outwards, the same in every row
    assert (top == top[0]).all() and (bottom == bottom[0]).all()
    assert (top[0, :, 0] > 150).all() and (top[0, :, 1] == 0).all() and (bottom[0, :, 1] > 150).all() and (bottom[0, :, 0] == 0).all()
    square = Image.new("RGB", (64, 64), (10, 20, 30))
    assert np.asarray(resize_and_fill(square, 512, 512)).shape == (512, 512, 3)


class Payload:
    """A pickle that runs code when an ordinary unpickler loads it: it writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('this ran')",)


def test_a_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    as_torch = tmp_path / "model-resnet_custom_v3.pt"
    torch.save({"n_Conv_0.weight": torch.zeros(1), "tags": Payload(marker)}, as_torch)  # torch's zip layout, poisoned
    as_pickle = tmp_path / "plain.pt"
    as_pickle.write_bytes(pickle.dumps(Payload(marker), protocol=2))  # the legacy layout: one bare pickle, as torch once wrote them
    preprocess = make_dataset(tmp_path / "data", {"red.png": (200, 0, 0)})
    for path in (as_torch, as_pickle):
        with pytest.raises(InputError, match=rf"caption.deepbooru.model: .*{path.name} was refused.*Unsupported global.*exec.*runs no code"):
            write_captions(preprocess, tmp_path / "out", settings("deepbooru", deepbooru={"model": str(path)}), tmp_path / "store")
        assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(InputError, match=r"caption.deepbooru.model: .*garbage.pt is not a PyTorch weights file"):
        load_deepbooru(garbage, torch.device("cpu"))
    pickle.loads(as_pickle.read_bytes())  # the payload is live: an ordinary unpickler runs it
    assert marker.read_text() == "this ran"


def test_the_full_size_network_loads_a_file_in_the_real_layout(tmp_path):
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in DeepDanbooruModel().state_dict().items()}
    assert len(shapes) == 179 + 178  # n_Conv_0 … n_Conv_178, each with a bias but the last
    assert shapes["n_Conv_0.weight"] == (64, 3, 7, 7) and shapes["n_Conv_178.weight"] == (9176, 4096, 1, 1)
    assert shapes["n_Conv_100.weight"] == (1024, 1024, 1, 1) and shapes["n_Conv_98.weight"] == (256, 256, 3, 3)
    convs, _ = deepbooru_layout()
    assert [c.index for c in convs if c.stride == 2] == [0, 11, 13, 36, 38, 98, 100, 158, 160, 168, 170]
    # the file as the webui reads it; each tensor is one stored number broadcast to its shape, so the file is small
    state = {name: torch.zeros(()).expand(shape) for name, shape in shapes.items()}
    state["tags"] = [f"tag_{i}" for i in range(9175)] + ["rating:safe"]
    path = tmp_path / "model-resnet_custom_v3.pt"
    torch.save(state, path)
    model = load_deepbooru(path, torch.device("cpu"))
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == shapes
    assert len(model.tags) == 9176 and model.tags[-1] == "rating:safe"
    assert sum(t.numel() for t in model.parameters()) > 150_000_000  # ResNet-152-sized, with a 4,096-wide last stage
    del state["n_Conv_57.bias"]
    state["n_Conv_3.weight"] = torch.zeros(()).expand(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(InputError, match=r"does not fit DeepDanbooru's network \(n_Conv_3.weight: \(64, 64, 1, 1\), expected \(64, 64, 3, 3\); "
                                         r"missing n_Conv_57.bias\)"):
        load_deepbooru(path, torch.device("cpu"))


def test_blip_writes_one_sentence_per_image_and_caches_them(tmp_path, blip_folder):
    preprocess = make_dataset(tmp_path / "data")
    out, store = tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"
    blip = {"model": str(blip_folder), "max_length": 12, "min_length": 5, "num_beams": 2}
    first = write_captions(preprocess, out, settings("blip", blip=blip), store)
    assert (first.runs["blip"].computed, first.runs["blip"].reused) == (3, 0)
    vocabulary = set(WORDS)
    for name in COLOURS:
        text = (out / Path(name).with_suffix(".txt").name).read_text(encoding="utf-8")
        words = text.split()
        assert "\n" not in text and 1 <= len(words) <= 11 and set(words) <= vocabulary, text  # no [DEC], [SEP] or [PAD] left
    assert (first.table.source == "blip").all() and not (out / "tags.csv").exists()
    again = write_captions(preprocess, out, settings("blip", blip=blip), store)
    assert (again.runs["blip"].computed, again.runs["blip"].reused) == (0, 3) and again.table.equals(first.table)
    longer = write_captions(preprocess, out, settings("blip", blip={**blip, "num_beams": 1}), store)
    assert longer.runs["blip"].computed == 3  # other generation settings: other sentences, so the model runs again


def test_blip_refuses_missing_folders_and_files_by_name(tmp_path, blip_folder):
    preprocess = make_dataset(tmp_path / "data", {"red.png": (200, 0, 0)})

    def run(model):
        return write_captions(preprocess, tmp_path / "out", settings("blip", blip={"model": str(model)}), tmp_path / "store")

    with pytest.raises(ValueError, match="caption.blip.model: not set"):
        write_captions(preprocess, tmp_path / "out", settings("blip"), tmp_path / "store")
    with pytest.raises(FileNotFoundError, match=r"caption.blip.model: the folder .*nowhere does not exist"):
        run(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "preprocessor_config.json", "vocab.txt"):
        (partial / name).write_bytes((blip_folder / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"partial/model.safetensors does not exist \(nor model.safetensors.index.json, pytorch_model.bin"):
        run(partial)
    (partial / "model.safetensors").write_bytes((blip_folder / "model.safetensors").read_bytes())
    (partial / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"partial/tokenizer.json does not exist \(nor vocab.txt\)"):
        run(partial)


def test_combine_joins_the_methods_texts_in_order(tmp_path, deepbooru_file, blip_folder):
    preprocess = make_dataset(tmp_path / "data", sidecars={"grey.png": "my own words"})
    out, store = tmp_path / "out" / "caption", tmp_path / "out" / "cache" / "tagger"
    sections = {"deepbooru": {"model": str(deepbooru_file), "threshold": 0.6}, "blip": {"model": str(blip_folder), "max_length": 10}}
    alone = {method: write_captions(preprocess, out, settings(method, **sections), store).table for method in ("deepbooru", "blip")}

    def combined(order, methods=("existing", "combine", "filename"), **changes):
        result = write_captions(preprocess, out, settings(list(methods), combine=list(order), **{**sections, **changes}), store)
        return result, result.table.set_index("image")

    summary, table = combined(["deepbooru", "blip"])
    for stem in ("red", "blue"):
        assert table.caption[f"{stem}.png"] == f"{caption_of(alone['deepbooru'], stem)}, {caption_of(alone['blip'], stem)}"
        assert table.source[f"{stem}.png"] == "deepbooru+blip"
    assert table.caption["grey.png"] == "my own words" and table.source["grey.png"] == "existing"  # the chain stopped before the models
    assert summary.runs["deepbooru"].reused == summary.runs["blip"].reused == 2  # …so only two images needed them
    _, reverse = combined(["blip", "deepbooru"])
    assert reverse.caption["red.png"] == f"{caption_of(alone['blip'], 'red')}, {caption_of(alone['deepbooru'], 'red')}"
    _, no_tags = combined(["deepbooru", "blip", "filename"], deepbooru={"model": str(deepbooru_file), "threshold": 1.0})
    assert no_tags.caption["red.png"] == f"{caption_of(alone['blip'], 'red')}, red" and no_tags.source["red.png"] == "blip+filename"

    with pytest.raises(ValueError, match=r"caption.combine: \['deepbooru', 'blip'\] is set, but caption.method .* has no combine step"):
        settings(["existing", "deepbooru"], combine=["deepbooru", "blip"])
    with pytest.raises(ValueError, match=r"caption.method: combine needs caption.combine"):
        settings(["combine"])
    with pytest.raises(ValueError, match=r"caption.combine: .*(too short|should be non-empty|is not valid)"):
        settings(["combine"], combine=["blip"])


def test_model_files_are_workflow_inputs(tmp_path, deepbooru_file, blip_folder):
    caption = {"method": ["existing", "combine"], "combine": ["deepbooru", "blip"],
               "deepbooru": {"model": str(deepbooru_file)}, "blip": {"model": str(blip_folder)}}
    inputs = caption_inputs(caption)
    assert inputs[0] == str(deepbooru_file) and str(blip_folder / "model.safetensors") in inputs and str(blip_folder / "config.json") in inputs
    assert caption_inputs({"method": "existing", "deepbooru": {"model": str(deepbooru_file)}}) == []
    with pytest.raises(ValueError, match=r"caption.deepbooru.model: not set; give the path of DeepDanbooru's model-resnet_custom_v3.pt"):
        caption_inputs({"method": "deepbooru"})
    with pytest.raises(FileNotFoundError, match=r"caption.deepbooru.model: .*missing.pt does not exist"):
        caption_inputs({"method": "deepbooru", "deepbooru": {"model": str(tmp_path / "missing.pt")}})


def test_cuda_without_a_gpu_is_refused_naming_the_key(tmp_path, deepbooru_file, blip_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, also where there is one
    preprocess = make_dataset(tmp_path / "data", {"red.png": (200, 0, 0)})
    for method, section in (("deepbooru", {"model": str(deepbooru_file)}), ("blip", {"model": str(blip_folder)})):
        with pytest.raises(InputError, match=rf"caption.{method}.device: cuda, but this torch sees no GPU"):
            write_captions(preprocess, tmp_path / "out", settings(method, **{method: {**section, "device": "cuda"}}), tmp_path / "store")

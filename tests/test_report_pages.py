"""The report pages render in headless Chromium with every picture and link in place (issue 17).

The pages are the real ones: the evaluate stage run on a two-checkpoint run of the demo data, then the overview.
Another page joins the check by adding its (name, path) to report_pages() below (which the copy-and-break test reuses on a copied folder).
"""
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

from page_check import BROWSER_NAMES, GET_A_BROWSER, PageChecker, find_browser
from stages.common.config import validate_config
from stages.common.embedding.core import Embedding, save_embedding_files
from stages.common.models import load_model
from stages.evaluate.overview import write_overview
from stages.evaluate.report import RunToEvaluate, evaluate_run
from stages.train.preflight_page import write_preflight_page
from stages.train.preflight_report import build_preflight
from stages.train.step_timing import measure_steps

pytestmark = pytest.mark.skipif(find_browser() is None, reason=f"no headless Chromium on PATH ({' or '.join(BROWSER_NAMES)}): {GET_A_BROWSER}")

RUN = "zzqtok"
EARLIER = "earlier-20261201-120000"  # a retrained run's previous training: the run page links its last checkpoint
# small and fast: 64 px, 2 sampler steps, 4 validation triples; grid_steps makes baseline.png
SECTION = {**validate_config({})["evaluate"], "prompts": ["a photo of [name]", "[name] on a beach"], "seeds": [1, 2],
           "steps": 2, "validation_samples": 4, "grid_steps": [2]}


def write_run(train_dir, vectors_by_step: dict[int, torch.Tensor]) -> None:
    """steps/{RUN}-{step}.* for every step, the last also as the final {RUN}.*, a loss.csv (as in test_evaluate.py)."""
    steps = sorted(vectors_by_step)
    for step in steps:
        save_embedding_files(Embedding(RUN, {"emb_params": vectors_by_step[step]}, step=step), train_dir / "steps", f"{RUN}-{step}")
    save_embedding_files(Embedding(RUN, {"emb_params": vectors_by_step[steps[-1]]}, step=steps[-1]), train_dir, RUN)
    pd.DataFrame({"step": range(1, steps[-1] + 1), "loss": 1.0, "lr": 0.005, "images_per_s": 1.0}).to_csv(train_dir / "loss.csv", index=False)


@pytest.fixture(scope="module")
def checker():
    with PageChecker() as one_browser:
        yield one_browser


@pytest.fixture(scope="module")
def report_folder(demo_prepared, tmp_path_factory, clip_folder):
    """A folder with train/ (a run of two checkpoints and an earlier training) and out/evaluate/ (its pages)."""
    root = tmp_path_factory.mktemp("report_pages")
    bundle = load_model("builtin:tiny-sd15")
    weight = bundle.text_encoder.get_input_embeddings().weight.detach()
    toy = weight[bundle.tokenizer("toy", add_special_tokens=False).input_ids[0]]
    vectors = torch.stack([toy, toy])
    write_run(root / "train", {2: vectors, 4: vectors + 0.1})
    save_embedding_files(Embedding(RUN, {"emb_params": vectors * 3}, step=10), root / "train" / "steps" / EARLIER, f"{RUN}-10")
    for stage in ("preprocess", "caption"):  # the pre-flight report reads them where the workflow puts them
        shutil.copytree(demo_prepared / stage, root / "out" / stage)
    config = validate_config({"out_dir": str(root / "out"), "preprocess": {"size": 64}, "runs": {RUN: {"init_text": "toy", "vectors": 2}}})
    write_preflight_page(root / "out" / "preflight", build_preflight(config, lambda: load_model("builtin:tiny-sd15"), measure_steps))
    run = RunToEvaluate(RUN, RUN, "captions", root / "train", demo_prepared / "latents", demo_prepared / "caption",
                        validation_split=0.0, init_text="toy", init_from=None, images_dir=demo_prepared / "preprocess")
    evaluate_run(bundle, run, {**SECTION, "clip_model": str(clip_folder)}, (64, 64), root / "out" / "evaluate" / RUN)
    write_overview(root / "out" / "evaluate", [RUN])
    return root


def report_pages(root) -> list[tuple[str, object]]:
    """Every page the check covers, (name, path), under a report folder or a copy of one."""
    return [
        ("run", root / "out" / "evaluate" / RUN / "index.html"),
        ("overview", root / "out" / "evaluate" / "index.html"),
        ("preflight", root / "out" / "preflight" / "index.html"),
    ]


def test_every_page_renders_with_all_its_pictures_and_links(checker, report_folder, tmp_path):
    run_page = (report_folder / "out" / "evaluate" / RUN / "index.html").read_text()
    for shown in ("grid.png", "checkpoints.png", "baseline.png", "loss.png", "similarity.png", "thumbs/toy_00.jpg", "image_loss.csv",
                  f"{EARLIER}/{RUN}-10.safetensors", "../../preflight/index.html"):
        assert shown in run_page  # the pictures and links the check must see are on the page
    broken = {}
    for name, page in report_pages(report_folder):
        shot = tmp_path / f"{name}.png"
        broken[name] = checker.render_page(page, shot)
        picture = Image.open(shot).convert("RGB")
        assert picture.width > 400 and picture.height > 300, f"{name}: screenshot {picture.size}"
        assert picture.getcolors(maxcolors=50) is None, f"{name}: the screenshot is (nearly) one flat colour"
    assert broken == {name: [] for name, _ in report_pages(report_folder)}


@pytest.mark.parametrize("remove, expected", [
    (f"out/evaluate/{RUN}/grid.png", {"run": ["grid.png"], "overview": [f"{RUN}/grid.png"], "preflight": []}),  # a picture
    (f"out/evaluate/{RUN}/val_loss.csv", {"run": ["val_loss.csv"], "overview": [], "preflight": []}),  # a link
    ("out/preflight/aspect_ratios.png", {"run": [], "overview": [], "preflight": ["aspect_ratios.png"]}),
    (f"train/steps/{EARLIER}/{RUN}-10.safetensors", {"run": [f"../../../train/steps/{EARLIER}/{RUN}-10.safetensors"], "overview": [],
                                                   "preflight": []}),
], ids=["image", "link", "preflight-image", "link-outside"])
def test_a_missing_file_is_reported_by_name(checker, report_folder, tmp_path, remove, expected):
    copy = tmp_path / "copy"
    shutil.copytree(report_folder, copy)
    (copy / remove).unlink()
    found = {name: checker.render_page(page, tmp_path / f"{name}.png") for name, page in report_pages(copy)}
    assert found == expected

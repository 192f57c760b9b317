"""The evaluate stage on a run folder the tests write: validation loss per checkpoint, the best one, grids, report."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from stages.common.embedding.read import read_embedding
from stages.common.embedding.core import Embedding, EmbeddingError, save_embedding_files
from stages.common.config import validate_config
from stages.common.models import load_model
from stages.evaluate.grid import spread_steps
from stages.evaluate.report import RunToEvaluate, evaluate_run
from stages.evaluate.validation import best_step, load_checkpoints

RUN = "zzqtok"
SECTION = {**validate_config({})["evaluate"], "prompts": ["a photo of [name]", "[name] on a beach"], "seeds": [1, 2],
           "steps": 2, "validation_samples": 8}


def write_run(train_dir, vectors_by_step: dict[int, torch.Tensor]) -> None:
    """steps/{RUN}-{step}.* for every step, and the last one also as the final {RUN}.*, with a loss.csv."""
    steps = sorted(vectors_by_step)
    for step in steps:
        embedding = Embedding(RUN, {"emb_params": vectors_by_step[step]}, step=step)
        save_embedding_files(embedding, train_dir / "steps", f"{RUN}-{step}")
    save_embedding_files(Embedding(RUN, {"emb_params": vectors_by_step[steps[-1]]}, step=steps[-1]), train_dir, RUN)
    pd.DataFrame({"step": range(1, steps[-1] + 1), "loss": 1.0, "lr": 0.005, "images_per_s": 1.0}).to_csv(train_dir / "loss.csv", index=False)


def run_of(tmp_path, demo_prepared, init_text: str = "") -> RunToEvaluate:
    return RunToEvaluate(RUN, RUN, "captions", tmp_path / "train", demo_prepared / "latents", demo_prepared / "caption",
                         validation_split=0.0, init_text=init_text, init_from=None)


@pytest.fixture
def vectors(tiny_bundle):
    """Two vectors of the word 'toy' (what the demo shows), and the same scaled far out of range."""
    weight = tiny_bundle.text_encoder.get_input_embeddings().weight.detach()
    toy = weight[tiny_bundle.tokenizer("toy", add_special_tokens=False).input_ids[0]]
    sensible = torch.stack([toy, toy])
    return {"sensible": sensible, "wild": sensible * 60 + 3}


def test_every_checkpoint_is_scored_on_the_same_noise_and_the_best_is_copied(tiny_bundle, vectors, demo_prepared, tmp_path):
    # steps 2 and 6 hold the same vectors, step 4 the wild ones
    write_run(tmp_path / "train", {2: vectors["sensible"], 4: vectors["wild"], 6: vectors["sensible"].clone()})
    out = tmp_path / "evaluate"
    metrics = evaluate_run(tiny_bundle, run_of(tmp_path, demo_prepared), SECTION, (64, 64), out)

    table = pd.read_csv(out / "val_loss.csv")
    assert table.step.tolist() == [0, 2, 4, 6] and table.start[0] and table.file[0] == "init_text ''"  # the zero vectors it began from
    assert not table.start[1:].any()
    loss = dict(zip(table.step, table.val_loss))
    assert loss[2] == loss[6]  # same vectors, same fixed noise and timesteps: the same number
    assert loss[4] != loss[2]  # the vectors do change it
    expected_best = 2 if loss[2] < loss[4] else 4  # ties go to the earlier step
    assert metrics["best_step"] == expected_best == best_step(table)
    best = read_embedding(out / "best" / f"{RUN}.safetensors")
    assert torch.equal(best.vectors["emb_params"], vectors["sensible" if expected_best == 2 else "wild"])
    assert read_embedding(out / "best" / f"{RUN}.pt").step == expected_best
    assert table.vector_norm[0] == 0 and table.vector_norm[2] > 10 * table.vector_norm[1]

    # rerunning (a new process, so a fresh model) gives the same validation losses: the probe is seeded
    again = evaluate_run(load_model("builtin:tiny-sd15"), run_of(tmp_path, demo_prepared), SECTION, (64, 64), tmp_path / "again")
    assert pd.read_csv(tmp_path / "again" / "val_loss.csv").val_loss.tolist() == table.val_loss.tolist()
    assert again["best_step"] == metrics["best_step"]


def test_the_report_has_the_grids_the_curve_and_every_checkpoint(tiny_bundle, vectors, demo_prepared, tmp_path):
    write_run(tmp_path / "train", {step: vectors["sensible"] + 0.01 * step for step in (2, 4, 6, 8, 10)})
    out = tmp_path / "evaluate"
    metrics = evaluate_run(tiny_bundle, run_of(tmp_path, demo_prepared), {**SECTION, "checkpoint_grid": 3}, (64, 64), out)

    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64, 2 * (64 + 18))  # 2 seeds × 2 prompts, each row with its label
    checkpoints = Image.open(out / "checkpoints.png")
    assert checkpoints.size == (2 * 64, 4 * (64 + 18))  # the start, then 3 of the 5 checkpoints
    assert Image.open(out / "loss.png").size[0] > 300
    page = (out / "index.html").read_text()
    for step in (2, 4, 6, 8, 10):
        assert f"<td>{step}</td>" in page
    for name in ("grid.png", "checkpoints.png", "loss.png", f"best/{RUN}.safetensors", "val_loss.csv"):
        assert f'"{name}"' in page
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and saved["checkpoints"] == 5 and saved["final_step"] == 10 and saved["validation_images"] == 8


def test_only_the_current_trainings_regular_checkpoints_are_scored_and_earlier_ones_listed(tiny_bundle, vectors, demo_prepared, tmp_path):
    train_dir = tmp_path / "train"
    write_run(train_dir, {2: vectors["sensible"], 4: vectors["sensible"] + 0.1})
    save_embedding_files(Embedding(RUN, {"emb_params": vectors["wild"]}, step=3), train_dir / "interrupted", f"{RUN}-3")  # a Ctrl-C snapshot
    earlier = train_dir / "steps" / "earlier-20261201-120000"
    for step in (5, 10):  # a retrained run's previous training, its final step 10 among them
        save_embedding_files(Embedding(RUN, {"emb_params": vectors["wild"]}, step=step), earlier, f"{RUN}-{step}")
    out = tmp_path / "evaluate"
    metrics = evaluate_run(tiny_bundle, run_of(tmp_path, demo_prepared), {**SECTION, "checkpoint_grid": 0}, (64, 64), out)
    assert pd.read_csv(out / "val_loss.csv").step.tolist() == [0, 2, 4]  # not the interrupt snapshot, not the earlier training
    assert metrics["earlier_trainings"] == [{"folder": str(earlier), "last_checkpoint": str(earlier / f"{RUN}-10.safetensors")}]
    page = (out / "index.html").read_text()
    assert "Earlier trainings" in page and f"earlier-20261201-120000/{RUN}-10.safetensors" in page


def test_no_checkpoint_grid_when_turned_off(tiny_bundle, vectors, demo_prepared, tmp_path):
    write_run(tmp_path / "train", {3: vectors["sensible"]})
    out = tmp_path / "evaluate"
    (out).mkdir()
    (out / "checkpoints.png").write_bytes(b"stale")
    evaluate_run(tiny_bundle, run_of(tmp_path, demo_prepared), {**SECTION, "checkpoint_grid": 0}, (64, 64), out)
    assert not (out / "checkpoints.png").exists()
    assert 'src="checkpoints.png"' not in (out / "index.html").read_text()


def test_spread_steps_keeps_first_last_and_best():
    steps = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert spread_steps(steps, 4, must_include=1000) == [100, 400, 700, 1000]
    picked = spread_steps(steps, 4, must_include=500)
    assert len(picked) == 4 and {500, 1000} <= set(picked)
    assert spread_steps(steps[:3], 5, must_include=200) == [100, 200, 300]
    assert spread_steps(steps, 0, must_include=500) == []


def test_best_step_prefers_the_earlier_of_equal_losses_and_skips_nan_and_the_start():
    files = ["init_text 'cat'", "steps/a-5.safetensors", "steps/a-10.safetensors", "a.safetensors"]
    table = pd.DataFrame({"step": [0, 5, 10, 15], "val_loss": [0.1, float("nan"), 0.5, 0.5], "start": [True, False, False, False],
                          "file": files})
    assert best_step(table) == 10
    with pytest.raises(ValueError, match="no checkpoint has a finite validation loss"):
        best_step(pd.DataFrame({"step": [5], "val_loss": [float("nan")], "start": [False], "file": ["a.safetensors"]}))


def test_the_start_is_scored_as_a_baseline_and_a_run_that_never_beats_it_is_flagged(tiny_bundle, vectors, demo_prepared, tmp_path):
    # init_text "toy toy" starts from exactly the "sensible" vectors; the run only made them wild
    write_run(tmp_path / "train", {2: vectors["wild"], 4: vectors["wild"].clone()})
    out = tmp_path / "evaluate"
    metrics = evaluate_run(tiny_bundle, run_of(tmp_path, demo_prepared, init_text="toy"), SECTION, (64, 64), out)
    table = pd.read_csv(out / "val_loss.csv")
    assert table.start[0] and table.file[0] == "init_text 'toy'" and table.vector_norm[0] == pytest.approx(float(vectors["sensible"].norm(dim=1).mean()))
    # the start is never the pick: it is not a trained embedding
    assert metrics["val_loss_start"] == pytest.approx(table.val_loss[0], abs=1e-6)
    assert table.val_loss[1] == table.val_loss[2] > table.val_loss[0]  # the wild vectors fit worse than the start
    assert metrics["beats_start"] is False and metrics["best_step"] == 2  # the earlier of the tie
    assert "No saved checkpoint scores better than the vectors training started from" in (out / "index.html").read_text()


def test_bad_run_folders_get_errors_naming_the_file(tiny_bundle, vectors, demo_prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{RUN}.safetensors does not exist; run the train stage"):
        load_checkpoints(tiny_bundle, tmp_path / "train", RUN)

    write_run(tmp_path / "train", {2: vectors["sensible"], 4: vectors["sensible"][:1]})  # the final has 1 vector
    with pytest.raises(EmbeddingError, match="mixes two trainings"):
        evaluate_run(tiny_bundle, run_of(tmp_path, demo_prepared), SECTION, (64, 64), tmp_path / "evaluate")

    wide = tmp_path / "wide"
    write_run(wide / "train", {2: torch.zeros(1, 1024)})
    with pytest.raises(EmbeddingError, match="1024"):
        evaluate_run(tiny_bundle, run_of(wide, demo_prepared), SECTION, (64, 64), wide / "evaluate")


def _example(name: str, sha: str):
    from stages.common.latents import LatentExample

    return LatentExample(name, torch.zeros(4, 8, 8), torch.zeros(4, 8, 8), "a caption", sha)


def test_the_validation_split_holds_out_whole_images_by_content_hash():
    from stages.common.latents import split_validation

    examples = [_example(f"img{i}.png", f"{(i * 7) % 10:02d}" + "f" * 62) for i in range(10)]
    examples += [_example(e.image, e.image_sha256) for e in examples]  # mirrored copies share image and hash
    trained, held = split_validation(examples, 0.2)
    assert {e.image for e in held} == {"img0.png", "img3.png"}  # the two lowest hashes: 00…, 01…
    assert len(held) == 4 and not {e.image for e in held} & {e.image for e in trained}
    assert split_validation(list(reversed(examples)), 0.2)[1][0].image in {"img0.png", "img3.png"}  # order does not matter
    assert split_validation(examples, 0.0) == (examples, [])
    assert len({e.image for e in split_validation(examples[:2], 0.01)[1]}) == 1  # at least one held out
    assert len({e.image for e in split_validation(examples[:2], 0.5)[0]}) == 1  # at least one trained on
    with pytest.raises(ValueError, match="validation_split: 0.2 needs at least 2 images"):
        split_validation(examples[:1], 0.2)


def test_with_a_split_the_validation_loss_uses_only_the_held_out_images(tiny_bundle, vectors, demo_prepared, tmp_path):
    from stages.common.latents import load_examples, split_validation

    write_run(tmp_path / "train", {2: vectors["sensible"]})
    run = RunToEvaluate(RUN, RUN, "captions", tmp_path / "train", demo_prepared / "latents", demo_prepared / "caption", 0.25, "", None)
    metrics = evaluate_run(tiny_bundle, run, SECTION, (64, 64), tmp_path / "evaluate")
    held = split_validation(load_examples(demo_prepared / "latents", demo_prepared / "caption"), 0.25)[1]
    assert metrics["validation_set"] == "held out" and metrics["validation_images"] == 2 == len(held)
    assert "images that training never saw" in (tmp_path / "evaluate" / "index.html").read_text()


def test_the_overview_page_compares_every_run_and_names_a_missing_one(tmp_path):
    from stages.evaluate.overview import write_overview

    base = {"token": "x", "final_step": 10, "best_step": 5, "val_loss_start": 1.0, "val_loss_best": 0.9, "val_loss_best_vs_start": -0.1,
            "beats_start": True, "validation_set": "held out", "validation_images": 2}
    for run, extra in (("alpha", {}), ("beta", {"beats_start": False, "val_loss_best": 1.2, "val_loss_best_vs_start": 0.2})):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps({**base, **extra}))
        pd.DataFrame({"step": [0, 5, 10], "val_loss": [1.0, 0.9, 0.95], "vector_norm": 0.1, "start": [True, False, False], "file": "x"}).to_csv(tmp_path / run / "val_loss.csv")
    page = write_overview(tmp_path, ["alpha", "beta"]).read_text()
    assert page.count("<tr><td") == 2 and '"alpha/index.html"' in page and '"beta/grid.png"' in page
    assert "-10.0%" in page and "+20.0%" in page and page.count("never beats the start") == 1
    assert '"val_loss.png"' in page and Image.open(tmp_path / "val_loss.png").size[0] > 300
    with pytest.raises(FileNotFoundError, match="gamma/metrics.json does not exist"):
        write_overview(tmp_path, ["alpha", "gamma"])


def test_the_baseline_grid_renders_the_prompt_without_the_embedding_beside_the_chosen_checkpoints(vectors, demo_prepared, tmp_path,
                                                                                                clip_folder):
    from stages.common.models import load_model
    from stages.evaluate.grid import LABEL_HEIGHT

    write_run(tmp_path / "train", {2: vectors["sensible"], 4: vectors["wild"]})
    grids, pages = {}, {}
    for step, clip_model in ((2, str(clip_folder)), (4, None)):  # the same run shown at one checkpoint, then at the other
        out = tmp_path / f"evaluate-{step}"
        run = RunToEvaluate(**{**run_of(tmp_path, demo_prepared, init_text="toy").__dict__, "images_dir": demo_prepared / "preprocess"})
        evaluate_run(load_model("builtin:tiny-sd15"), run, {**SECTION, "grid_steps": [step], "clip_model": clip_model}, (64, 64), out)
        grids[step] = np.asarray(Image.open(out / "baseline.png").convert("RGB")).astype(int)
        pages[step] = (out / "index.html").read_text()
        assert 'src="baseline.png"' in pages[step]
    # with a CLIP model: every baseline.png cell scored, the chart and the table on the page; without: how to add one
    scores = pd.read_csv(tmp_path / "evaluate-2" / "similarity.csv")
    assert len(scores) == 2 * len(SECTION["prompts"]) * len(SECTION["seeds"]) and scores.likeness.between(-1, 1).all()
    assert set(scores.column) == {"without the embedding", "step 2"} and "a photo of toy" in set(scores.prompt)
    assert 'src="similarity.png"' in pages[2] and "evaluate.clip_model: /path" not in pages[2] and pages[2].count("<td>4</td>") >= 2
    assert Image.open(tmp_path / "evaluate-2" / "similarity.png").size[0] > 300
    assert "similarity.png" not in pages[4] and "evaluate.clip_model: /path/to/folder" in pages[4]
    assert not (tmp_path / "evaluate-4" / "similarity.csv").exists()
    rows = len(SECTION["prompts"]) * len(SECTION["seeds"])
    assert grids[2].shape == (rows * (64 + LABEL_HEIGHT), 2 * 64, 3)  # prompt × seed rows; without, then the checkpoint

    def cell(grid, row: int, column: int):  # below the column's label, which is drawn over the image's top
        top = row * (64 + LABEL_HEIGHT) + LABEL_HEIGHT + 20
        return grid[top: top + 40, column * 64: (column + 1) * 64]

    for row in range(rows):
        assert np.array_equal(cell(grids[2], row, 0), cell(grids[4], row, 0))  # same seed, no embedding: the same picture
        assert not np.array_equal(cell(grids[2], row, 0), cell(grids[2], row, 1))  # the embedding changes it
    assert not np.array_equal(cell(grids[2], 0, 1), cell(grids[4], 0, 1))  # and each checkpoint its own way
    with pytest.raises(ValueError, match=r"evaluate.grid_steps: no checkpoint at step 3; the run saved steps 2, 4"):
        evaluate_run(load_model("builtin:tiny-sd15"), run_of(tmp_path, demo_prepared), {**SECTION, "grid_steps": [3]}, (64, 64),
                     tmp_path / "evaluate-3")


def test_the_baseline_prompt_swaps_the_trigger_for_the_init_text_or_drops_it():
    from stages.common.tokens import without_trigger

    assert without_trigger("a photo of demotok on a beach", "demotok", "toy") == "a photo of toy on a beach"
    assert without_trigger("demotok, red ball, demotok-neg", "demotok") == "red ball, demotok-neg"


def teach_unet(bundle, examples, vectors, steps: int = 100) -> None:
    """Train the tiny UNet itself on these latents and their prompts, as a pretrained model has seen its subjects.

    A random-weight UNet predicts no image's noise better than another's (measured on the demo plus a grey
    frame: every image within 0.7%, in no stable order), so a per-image loss could rank nothing.
    """
    import torch.nn.functional as F
    from stages.common.textual_inversion import probe_prompts
    from stages.evaluate.validation import CheckpointModel

    encoder = CheckpointModel(load_model("builtin:tiny-sd15"), Embedding(RUN, {"emb_params": vectors}), RUN, "captions", 1)
    with torch.no_grad():  # the prompts evaluate scores with, encoded by an identical model
        context = encoder.conditioning(probe_prompts(encoder.template, examples, RUN)).context
    latents = torch.stack([e.mean for e in examples]) * bundle.family.vae_scaling_factor
    unet, generator = bundle.unet, torch.Generator().manual_seed(0)
    unet.requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, bundle.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        loss = F.mse_loss(unet(bundle.scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.requires_grad_(False)


def test_an_off_concept_image_ranks_last_in_image_loss_and_is_flagged(vectors, tmp_path):
    from stages.cache_latents.encode import cache_latents
    from stages.cache_latents.settings import CacheSettings
    from stages.caption.captions import write_captions
    from stages.common.demo_data import write_demo_dataset
    from stages.common.latents import load_examples
    from stages.preprocess.prepare import PreprocessSettings, preprocess_folder

    source, out = tmp_path / "source", tmp_path / "out"
    write_demo_dataset(source)  # eight toys
    Image.new("RGB", (320, 320), (128, 128, 128)).save(source / "grey_frame.png")
    (source / "grey_frame.txt").write_text("a toy", encoding="utf-8")
    preprocess_folder(source, out / "preprocess", PreprocessSettings.from_schema(size=(64, 64)))
    write_captions(out / "preprocess", out / "caption", "existing")
    bundle = load_model("builtin:tiny-sd15")
    cache_latents(out / "preprocess", out / "latents", out / "store", bundle.vae, bundle.identity, settings=CacheSettings.from_schema())
    teach_unet(bundle, [e for e in load_examples(out / "latents", out / "caption") if e.image != "grey_frame.png"], vectors["sensible"])

    write_run(tmp_path / "train", {2: vectors["sensible"]})
    run = RunToEvaluate(RUN, RUN, "captions", tmp_path / "train", out / "latents", out / "caption", validation_split=0.0,
                        init_text="", init_from=None, images_dir=out / "preprocess")
    metrics = evaluate_run(bundle, run, {**SECTION, "image_loss_timesteps": 16, "checkpoint_grid": 0}, (64, 64), tmp_path / "evaluate")

    table = pd.read_csv(tmp_path / "evaluate" / "image_loss.csv", keep_default_na=False)
    assert len(table) == 9 and list(table.loss) == sorted(table.loss, reverse=True)  # worst first
    grey = table.iloc[0]
    assert grey.image == "grey_frame.png" and grey["rank"] == 9 and sorted(table["rank"]) == list(range(1, 10))
    assert table.outlier.tolist() == [True] + [False] * 8 and grey.z_score > 2 and "shows the concept" in grey.hint
    assert metrics["worst_image"] == "grey_frame.png" and metrics["image_outliers"] == ["grey_frame.png"]
    page = (tmp_path / "evaluate" / "index.html").read_text()
    assert 'src="thumbs/grey_frame.jpg"' in page and "1 image stands out" in page
    assert Image.open(tmp_path / "evaluate" / "thumbs" / "grey_frame.jpg").size == (64, 64)


def test_outlier_hints_name_a_tight_crop_or_a_caption_that_names_the_concept():
    from stages.evaluate.image_loss import GENERIC_HINT, outlier_hints, rank_images

    manifest = pd.DataFrame({"output": ["a.png", "b.png", "c.png"], "source": ["a.jpg", "b.jpg", "c.jpg"],
                             "width": 400, "height": 400, "crop_box": ["0 0 400 400", "100 100 280 280", "0 0 400 400"]})
    captions = {"a.png": "red ball, grass", "b.png": "red ball", "c.png": "a plush toy, red ball"}
    hints = outlier_hints(manifest, captions, ["plush", "toy"])
    assert "kept 20%" in hints["b.png"] and "names the concept (plush, toy)" in hints["c.png"] and "a.png" not in hints
    # when most captions name the concept, naming it explains nothing
    assert "c.png" not in outlier_hints(None, {**captions, "a.png": "toy"}, ["toy"])
    losses = pd.DataFrame({"image": [f"{i}.png" for i in range(9)] + ["b.png"], "split": "training",
                           "loss": [1.0] * 9 + [2.0], "caption": ""})
    ranked = rank_images(losses, hints)
    assert ranked.image[0] == "b.png" and ranked.outlier.sum() == 1 and ranked.hint[0] == hints["b.png"]
    assert rank_images(losses.assign(loss=1.0)).outlier.sum() == 0  # equal losses: nothing stands out
    # an outlier with no crop or caption to blame gets the plain advice; a row that is no outlier gets none
    assert rank_images(losses).hint[0] == GENERIC_HINT and ranked.hint[1] == ""


def test_a_missing_or_broken_image_gets_no_thumbnail_and_a_logged_reason(tmp_path, caplog):
    from stages.evaluate.image_loss import thumbnails

    Image.new("RGB", (200, 100), (10, 200, 10)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    table = pd.DataFrame({"image": ["good.png", "broken.png", "gone.png"]})
    written = thumbnails(table, tmp_path, tmp_path / "thumbs", size=64)
    assert written == {"good.png": "good.jpg"} and Image.open(tmp_path / "thumbs" / "good.jpg").size == (64, 32)
    assert "broken.png" in caplog.text and "gone.png" in caplog.text
    assert sorted(p.name for p in (tmp_path / "thumbs").iterdir()) == ["good.jpg"]  # no half-written file left

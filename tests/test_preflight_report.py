"""The pre-flight report: measured step time, facts from preprocess and caption, and settings known to fail."""
import json
import math

import pytest
from PIL import Image

from stages.common.config import validate_config
from stages.common.models import load_model
from stages.train.preflight_report import build_preflight, learning_rate_warning, settings_warnings
from stages.train.settings import TrainSettings
from stages.train.step_timing import StepTiming, measure_steps


def test_the_step_time_comes_from_timed_real_steps(tiny_bundle, monkeypatch):
    from stages.train.trainer import Trainer

    losses, batches, real_step = [], [], Trainer.train_step

    def counted(self):  # the trainer's own step, watched
        batches.append(len(self.examples))
        losses.append(real_step(self))
        return losses[-1]

    monkeypatch.setattr(Trainer, "train_step", counted)
    ticks = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])  # a clock read before and after each timed step
    settings = TrainSettings.from_schema("zzqtok", init_text="toy", batch_size=3)
    timing = measure_steps(tiny_bundle, settings, (8, 16), timed=3, warmup=1, clock=lambda: next(ticks))
    assert timing.step_seconds == [0.5, 0.25, 1.0] and timing.seconds_per_step == 0.5  # the median of what the clock said
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)  # one warm-up and three timed steps really ran
    assert batches == [3] * 4 and timing.latent_size == (8, 16)
    assert timing.device == "cpu" and timing.dtype == "float32" and timing.peak_memory_bytes > 100 * 2**20
    with pytest.raises(StopIteration):
        next(ticks)  # the clock was read only around the timed steps


def _dataset(folder):
    """The demo's toys, plus a copy of one (a duplicate), a broken file, a wide picture alone in its bucket, and a long caption."""
    from stages.common.demo_data import write_demo_dataset

    write_demo_dataset(folder)
    (folder / "copy_of_toy_00.png").write_bytes((folder / "toy_00.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    Image.new("RGB", (600, 200), (30, 90, 160)).save(folder / "wide.png")
    (folder / "wide.txt").write_text(", ".join(f"blue sky {i}" for i in range(40)), encoding="utf-8")


def test_the_report_counts_images_buckets_tokens_and_warns(tmp_path):
    from stages.caption.captions import write_captions
    from stages.preprocess.prepare import PreprocessSettings, preprocess_folder
    from stages.train.preflight_page import write_preflight_page

    _dataset(tmp_path / "source")
    out = tmp_path / "out"
    preprocess_folder(tmp_path / "source", out / "preprocess",
                      PreprocessSettings.from_schema(size=(128, 128), mode="bucket", bucket_min_side=64))
    write_captions(out / "preprocess", out / "caption", "existing")
    (tmp_path / "two_lines.txt").write_text("a photo of [name], [filewords]\na picture of [filewords]\n", encoding="utf-8")
    config = validate_config({
        "out_dir": str(out), "preprocess": {"size": 128, "mode": "bucket", "bucket_min_side": 64},
        "train": {"init_text": "toy", "vectors": 2, "batch_size": 2, "steps": 100},
        "runs": {"zzqgood": {}, "zzqhot": {"learning_rate": 0.5}, "zzqlines": {"template": str(tmp_path / "two_lines.txt"), "vectors": 3}},
    })
    loads = []
    measured = []

    def measure(bundle, settings, latent_size):
        measured.append((settings.name, latent_size))
        return StepTiming("cpu", "float32", latent_size, [0.2, 0.1, 0.3], 2**30, "resident")

    report = build_preflight(config, lambda: loads.append(1) or load_model("builtin:tiny-sd15"), measure, cache_dir=tmp_path / "cache")

    images = report["images"]
    assert images["sources_kept"] == 9 and len(images["duplicates"]) == 1 and [s["file"].endswith("broken.png") for s in images["skipped"]] == [True]
    assert max(images["aspect_ratios"]) == 3.0
    # zzqgood and zzqhot step alike (the rate changes no cost): timed once, then read from the cache; zzqlines has other vectors
    assert [name for name, _ in measured] == ["zzqgood", "zzqlines"] and len(loads) == 2
    largest = max(((b["height"] // 8, b["width"] // 8) for b in report["runs"]["zzqgood"]["buckets"]), key=lambda hw: hw[0] * hw[1])
    assert measured[0][1] == largest
    assert report["runs"]["zzqhot"]["timing"] == 0 and report["timings"][0]["runs"] == ["zzqgood", "zzqhot"]
    assert report["runs"]["zzqgood"]["estimated_training_seconds"] == 20.0  # 100 steps at the median 0.2 s

    good, hot, lines = (report["runs"][run] for run in ("zzqgood", "zzqhot", "zzqlines"))
    wide_bucket = [b for b in good["buckets"] if b["width"] > 2 * b["height"]]
    assert wide_bucket and wide_bucket[0]["latents"] == 1 and wide_bucket[0]["partial_batch"] == 1
    assert any("train.batch_size: 2 is larger than the smallest bucket" in w for w in good["warnings"])
    assert [w for w in hot["warnings"] if "learning_rate" in w][0].startswith("runs.zzqhot.learning_rate: most steps train at 0.5, far above")
    assert not any("learning_rate" in w for w in good["warnings"])
    assert [p["image"] for p in good["tokens"]["over_budget"]] == ["wide.png"] and good["tokens"]["missing_trigger"] == []
    assert len(lines["tokens"]["missing_trigger"]) == 9 and lines["tokens"]["prompts"] == 18  # one per image per template line
    assert good["tokens"]["tokens_left"] < 0 and set(report["warnings"]) >= set(hot["warnings"])

    page = write_preflight_page(out / "preflight", report).read_text()
    assert json.loads((out / "preflight" / "preflight.json").read_text()) == report
    assert 'src="aspect_ratios.png"' in page and "far above" in page and "wide.png: 1" in page and "0.200" in page
    assert Image.open(out / "preflight" / "aspect_ratios.png").size[0] > 400


@pytest.mark.parametrize("rate, vectors, says", [
    (0.005, 2, None),  # AUTOMATIC1111's default
    ("0.1:10, 0.005", 2, None),  # a brief high start, as the users' guides do
    (0.5, 2, "far above"),
    (0.04, 2, None), (0.04, 16, "far above"),  # more vectors, a lower top
    ("0.5:5, 0.005", 2, "some steps train at 0.5"),
    (1e-6, 2, "far below"),
])
def test_a_learning_rate_far_from_the_usual_range_for_its_vectors_is_named(rate, vectors, says):
    warning = learning_rate_warning(rate, vectors, 1000, "train.learning_rate")
    assert (warning is None) if says is None else (says in warning and warning.startswith("train.learning_rate: "))


@pytest.mark.parametrize("dtype, device, family, warns", [
    ("fp16", "cpu", "sdxl", True), ("auto", "cuda", "sdxl", True), ("auto", "cpu", "sdxl", False),
    ("bf16", "cuda", "sdxl", False), ("fp16", "cuda", "sd15", False),
])
def test_fp16_on_sdxls_vae_is_named(dtype, device, family, warns):
    config = validate_config({"cache_latents": {"dtype": dtype}, "runs": {"zzq": {}}})
    from stages.common.config import run_settings

    found = settings_warnings("zzq", run_settings(config, "zzq"), config, [], family, device)
    assert any(w.startswith("cache_latents.dtype") for w in found) == warns

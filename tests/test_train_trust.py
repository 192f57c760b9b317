"""The trainer behaves the same everywhere: identical runs, the right resume key, fp16 NaN skips, one size per batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from stages.common.models import load_model
from stages.common.latents import LatentExample, load_examples
from stages.train.order import BatchOrder
from stages.train.outputs import RunOutputs
from stages.train.resume import ResumeStore, resume_key
from stages.train.settings import TrainSettings
from stages.train.trainer import Trainer, train_embedding


def _train_by_hand(demo_prepared, out, steps: int) -> dict:
    """python -m stages.train in a process of its own, as a user or Snakemake runs it."""
    settings = {"model": {"path": "builtin:tiny-sd15", "family": "auto", "clip_skip": 1}, "preprocess": {"size": 64},
                "train": {"init_text": "cat", "vectors": 2, "steps": steps, "save_every": 0, "learning_rate": 0.005, "seed": 3,
                          "batch_size": 1}, "runs": {"demotok": {}}}
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # what the project sets itself is what is tested
    result = subprocess.run(
        [sys.executable, "-m", "stages.train", "--settings", json.dumps(settings), "--run", "demotok",
         "--latents", str(demo_prepared / "latents"), "--captions", str(demo_prepared / "caption"),
         "--out", str(out), "--state-dir", str(out / "state")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(str(out / "demotok.safetensors"))


def test_two_runs_with_the_same_seed_are_bit_identical(demo_prepared, tmp_path):
    first = _train_by_hand(demo_prepared, tmp_path / "first", steps=60)
    second = _train_by_hand(demo_prepared, tmp_path / "second", steps=60)
    assert torch.equal(first["emb_params"], second["emb_params"])


def test_the_resume_key_changes_with_what_changes_learning(tmp_path):
    manifest, captions, start = tmp_path / "manifest.csv", tmp_path / "captions.csv", tmp_path / "start.safetensors"
    manifest.write_text("image\na.png\n")
    captions.write_text("image,caption\na.png,a\n")
    start.write_bytes(b"first embedding")
    settings = {"learning_rate": 0.005, "init_from": str(start)}
    base = resume_key(settings, "model-a", "sd2", 1, manifest, captions)
    assert resume_key(settings, "model-a", "sd2", 1, manifest, captions) == base
    assert resume_key(settings, "model-a", "sd2", 2, manifest, captions) != base  # clip_skip
    assert resume_key(settings, "model-a", "sd2-v", 1, manifest, captions) != base  # same file trained as v-prediction
    start.write_bytes(b"another embedding, same path")
    assert resume_key(settings, "model-a", "sd2", 1, manifest, captions) != base  # init_from's content
    assert resume_key(dict(settings, steps=99, save_every=7), "model-a", "sd2", 1, manifest, captions) == \
        resume_key(settings, "model-a", "sd2", 1, manifest, captions)  # steps and saving do not change what is learned


def test_fp16_nan_steps_are_skipped_and_the_run_goes_on(demo_prepared, tmp_path):
    """With fp16 loss scaling (torch's CPU GradScaler), a NaN step is skipped and the scaler stays usable."""
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    broken = []
    for index, example in enumerate(examples):
        mean = example.mean.clone()
        if index % 2 == 0:
            mean[0, 0, 0] = float("nan")
        broken.append(LatentExample(example.image, mean, example.logvar, example.caption))
    settings = TrainSettings.from_schema(name="demotok", token="demotok", steps=8, save_every=2, max_nan_steps=8, precision="fp16", learning_rate=0.05)
    trainer = Trainer(load_model("builtin:tiny-sd15"), broken, settings, RunOutputs(tmp_path, "demotok"), ResumeStore(tmp_path / "state"))
    assert trainer.scaler.is_enabled()
    result = trainer.run()
    assert 0 < result.skipped_steps < 8 and len(result.losses) == 8
    assert torch.isfinite(result.embedding.vectors["emb_params"]).all()
    assert not torch.equal(result.embedding.vectors["emb_params"], result.initial_vectors["emb_params"])  # the finite steps trained


def _mixed_size_examples() -> list[LatentExample]:
    generator = torch.Generator().manual_seed(0)
    sizes = [(8, 8)] * 5 + [(8, 6)] * 4 + [(6, 8)] * 3  # three buckets; the last smaller than the batch
    return [LatentExample(f"img{i}.png", torch.randn(4, h, w, generator=generator), torch.full((4, h, w), -4.0), "a red toy")
            for i, (h, w) in enumerate(sizes)]


def test_bucketed_images_train_in_batches_of_one_size(tmp_path, caplog):
    examples = _mixed_size_examples()
    settings = TrainSettings.from_schema(name="demotok", token="demotok", steps=9, save_every=0, batch_size=4, learning_rate=0.05)
    trainer = Trainer(load_model("builtin:tiny-sd15"), examples, settings, RunOutputs(tmp_path, "demotok"), ResumeStore(None))
    shapes, batch = [], trainer._batch

    def recording_batch():
        latents, prompts, sizes = batch()
        shapes.append(tuple(latents.shape))
        return latents, prompts, sizes

    trainer._batch = recording_batch
    result = trainer.run()
    assert len(result.losses) == 9 and torch.isfinite(result.embedding.vectors["emb_params"]).all()
    assert {shape[2:] for shape in shapes} == {(8, 8), (8, 6), (6, 8)}  # every size trained
    # a pass is 5 → 4+1, 4 → 4, 3 → 3: batches never mix sizes, and a small bucket gives a smaller batch
    assert sorted(shape[0] for shape in shapes[:4]) == [1, 3, 4, 4]
    assert "only 3 images of latent size 8x6" in caplog.text and "fewer than batch_size 4" in caplog.text


def test_bucketed_order_is_seeded_and_resumable():
    sizes = [e.latent_size for e in _mixed_size_examples()]
    order = BatchOrder(sizes, batch_size=4, repeats=2, seed=5)
    one_pass = [order.next_batch() for _ in range(7)]  # 10→4+4+2, 8→4+4, 6→4+2
    assert sorted(len(b) for b in one_pass) == [2, 2, 4, 4, 4, 4, 4]
    assert sorted(i for b in one_pass for i in b) == sorted(list(range(12)) * 2)
    assert all(len({sizes[i] for i in batch}) == 1 for batch in one_pass)
    assert [BatchOrder(sizes, 4, 2, seed=5).next_batch() for _ in range(1)] == one_pass[:1]
    saved = order.state_dict()
    ahead = [order.next_batch() for _ in range(5)]
    order.load_state_dict(saved)
    assert [order.next_batch() for _ in range(5)] == ahead


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deterministic_switch_trains_on_cpu(demo_prepared, tmp_path, precision):
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    settings = TrainSettings.from_schema(name="demotok", token="demotok", steps=2, save_every=0, deterministic=True, precision=precision)
    switch_during_steps = []
    try:
        result = train_embedding(load_model("builtin:tiny-sd15"), examples, settings, tmp_path,
                                 reporter=lambda *_: switch_during_steps.append(torch.are_deterministic_algorithms_enabled()))
    finally:
        torch.use_deterministic_algorithms(False)  # a process-wide switch: leave other tests as they were
    assert switch_during_steps == [True, True]  # every step ran with only deterministic kernels allowed
    assert torch.isfinite(result.embedding.vectors["emb_params"]).all() and len(result.losses) == 2

"""Crash-proof training: SIGTERM saves and resumes to the same result; NaN never reaches a file."""
import os
import signal

import pytest
import torch

from stages.common.embedding.read import read_embedding
from stages.common.models import load_model
from stages.common.latents import LatentExample, load_examples
from stages.train.interrupt import TrainingInterrupted
from stages.common.layout import latest_snapshot
from stages.train.settings import TrainSettings
from stages.train.trainer import NonFiniteLoss, train_embedding

# every random stream in play: sampled latents, templates, tag shuffling and dropout
SETTINGS = dict(name="demotok", token="demotok", init_text="red toy", vectors=2, learning_rate="0.05:6, 0.02", steps=12,
                batch_size=2, save_every=5, latent_sampling="random", template="subject_filewords", shuffle_tags=True,
                tag_dropout=0.2, lr_scheduler="cosine", lr_warmup_steps=2)


def _examples(demo_prepared):
    return load_examples(demo_prepared / "latents", demo_prepared / "caption")


def test_sigterm_saves_and_a_rerun_resumes_to_the_same_embedding(demo_prepared, tmp_path):
    settings = TrainSettings.from_schema(**SETTINGS)
    straight = train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, tmp_path / "straight", tmp_path / "state1")

    def terminate_at_step_7(step, *_):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends on pre-emption

    out, state = tmp_path / "interrupted", tmp_path / "state2"
    with pytest.raises(TrainingInterrupted) as stopped:
        train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, out, state, reporter=terminate_at_step_7)
    assert stopped.value.step == 7 and stopped.value.signal_name == "SIGTERM"
    assert (out / "interrupted" / "demotok-7.safetensors").is_file() and (state / "state.pt").is_file()  # not a regular checkpoint
    assert not (out / "demotok.safetensors").exists()  # the final file only appears when training is finished

    resumed = train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, out, state)
    assert resumed.resumed_from == 7
    assert sorted(p.name for p in (out / "steps").glob("*.safetensors")) == ["demotok-10.safetensors", "demotok-12.safetensors", "demotok-5.safetensors"]  # none set aside
    assert [p.name for p in (out / "interrupted").glob("*.safetensors")] == ["demotok-7.safetensors"]
    # bit-identical, not close: the same seed on the same machine gives the same bits, interrupted or not
    assert torch.equal(resumed.embedding.vectors["emb_params"], straight.embedding.vectors["emb_params"])
    assert resumed.losses == straight.losses
    snapshot = torch.load(out / "interrupted" / "demotok-7.pt", weights_only=True)
    assert snapshot["name"] == "demotok-7" and snapshot["step"] == 7  # AUTOMATIC1111 names each snapshot name-N


def test_a_finished_run_rewrites_deleted_outputs_without_training(demo_prepared, tmp_path):
    settings = TrainSettings.from_schema(**dict(SETTINGS, steps=3, save_every=0))
    first = train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, tmp_path / "out", tmp_path / "state")
    (tmp_path / "out" / "demotok.safetensors").unlink()  # what Snakemake does before a rerun

    calls = []
    again = train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, tmp_path / "out", tmp_path / "state",
                            reporter=lambda *args: calls.append(args))
    assert calls == [] and again.resumed_from == 3
    assert torch.equal(again.embedding.vectors["emb_params"], first.embedding.vectors["emb_params"])
    assert (tmp_path / "out" / "demotok.safetensors").is_file()


def test_a_new_training_sets_the_last_trainings_snapshots_aside(demo_prepared, tmp_path):
    out = tmp_path / "out"
    first = TrainSettings.from_schema(**dict(SETTINGS, steps=4, save_every=2))
    train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), first, out, tmp_path / "state" / "a")
    assert sorted(p.name for p in (out / "steps").glob("*.safetensors")) == ["demotok-2.safetensors", "demotok-4.safetensors"]
    first_final = read_embedding(out / "demotok.safetensors").vectors["emb_params"]

    # another learning rate is another training (another resume key, so another state folder)
    second = TrainSettings.from_schema(**dict(SETTINGS, steps=3, save_every=1, learning_rate=0.01))
    train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), second, out, tmp_path / "state" / "b")
    assert sorted(p.name for p in (out / "steps").glob("*.safetensors")) == ["demotok-1.safetensors", "demotok-2.safetensors", "demotok-3.safetensors"]
    earlier = list((out / "steps").glob("earlier-*"))
    assert len(earlier) == 1 and sorted(p.name for p in earlier[0].iterdir()) == [
        "demotok-2.pt", "demotok-2.safetensors", "demotok-4.pt", "demotok-4.safetensors"]
    # the first training's final embedding survives the retrain, beside its checkpoints
    assert torch.equal(read_embedding(earlier[0] / "demotok-4.safetensors").vectors["emb_params"], first_final)
    assert latest_snapshot(earlier[0], "demotok") == earlier[0] / "demotok-4.safetensors"
    assert not torch.equal(  # the demotok-2 in steps/ is the new training's, not the old one kept aside
        read_embedding(out / "steps" / "demotok-2.safetensors").vectors["emb_params"],
        read_embedding(earlier[0] / "demotok-2.safetensors").vectors["emb_params"])


def _with_nan(examples, every_other: bool):
    broken = []
    for index, example in enumerate(examples):
        mean = example.mean.clone()
        if not every_other or index % 2 == 0:
            mean[0, 0, 0] = float("nan")
        broken.append(LatentExample(example.image, mean, example.logvar, example.caption))
    return broken


def test_nan_loss_stops_the_run_and_nothing_is_saved(demo_prepared, tmp_path):
    settings = TrainSettings.from_schema(**dict(SETTINGS, steps=20, max_nan_steps=3, save_every=1))
    with pytest.raises(NonFiniteLoss, match="3 steps gave NaN/inf"):
        train_embedding(load_model("builtin:tiny-sd15"), _with_nan(_examples(demo_prepared), every_other=False), settings, tmp_path / "out")
    assert not (tmp_path / "out" / "demotok.safetensors").exists() and not (tmp_path / "out" / "demotok.pt").exists()
    _assert_all_saved_vectors_finite(tmp_path / "out")


def test_nan_steps_are_skipped_and_never_reach_a_file(demo_prepared, tmp_path):
    settings = TrainSettings.from_schema(**dict(SETTINGS, steps=8, batch_size=1, max_nan_steps=8, save_every=2))
    result = train_embedding(load_model("builtin:tiny-sd15"), _with_nan(_examples(demo_prepared), every_other=True), settings, tmp_path / "out")
    assert 0 < result.skipped_steps < 8
    assert (tmp_path / "out" / "demotok.safetensors").is_file()
    _assert_all_saved_vectors_finite(tmp_path / "out")


def _assert_all_saved_vectors_finite(folder):
    from safetensors.torch import load_file

    for path in folder.rglob("*.safetensors"):
        assert torch.isfinite(load_file(str(path))["emb_params"]).all(), path
    for path in folder.rglob("*.pt"):
        assert torch.isfinite(torch.load(path, weights_only=True)["string_to_param"]["*"]).all(), path


def test_loss_csv_grows_as_training_goes(demo_prepared, tmp_path):
    """loss.csv is there to watch a run: each finished step has its row at once, not only at save points."""
    import pandas as pd

    rows_seen = []
    settings = TrainSettings.from_schema(**dict(SETTINGS, steps=6, save_every=0))
    train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, tmp_path / "out",
                    reporter=lambda step, *_: rows_seen.append((step, len(pd.read_csv(tmp_path / "out" / "loss.csv")))))
    assert rows_seen == [(step, step) for step in range(1, 7)]

import zipfile

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stages.common.latents import load_examples
from stages.train.settings import TrainSettings
from stages.train.trainer import train_embedding


def _settings(**overrides):
    values = dict(name="demotok", token="demotok", init_text="red toy", vectors=2, learning_rate=0.05, steps=60,
                  batch_size=4, save_every=20, seed=0)
    values.update(overrides)
    return TrainSettings.from_schema(**values)


@pytest.fixture(scope="module")
def trained(demo_prepared, tmp_path_factory):
    """One 60-step run shared by the tests below (they only read its results)."""
    from stages.common.models import load_model

    bundle = load_model("builtin:tiny-sd15")
    base_before = bundle.text_encoder.get_input_embeddings().weight.detach().clone()
    examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
    out = tmp_path_factory.mktemp("trained")
    result = train_embedding(bundle, examples, _settings(), out)
    return result, bundle, base_before, out


def test_embedding_learns_and_lowers_the_loss(trained):
    result, *_ = trained
    vectors = result.embedding.vectors["emb_params"]
    assert vectors.shape == (2, 32)
    assert not torch.allclose(vectors, result.initial_vectors["emb_params"])  # it moved away from "red toy"
    # same noise and timesteps before and after: a fair comparison
    assert result.probe_loss_end < 0.97 * result.probe_loss_start, (result.probe_loss_start, result.probe_loss_end)


def test_only_the_new_vectors_change(trained):
    _, bundle, base_before, _ = trained
    embedding = bundle.text_encoder.get_input_embeddings()
    assert torch.equal(embedding.base_weight, base_before)  # all 49,408 rows bit-identical
    assert all(not p.requires_grad for p in bundle.unet.parameters())
    assert all(not p.requires_grad for p in bundle.vae.parameters())


def test_outputs_in_every_format(trained):
    result, bundle, _, out = trained
    safetensors = load_file(str(out / "demotok.safetensors"))
    assert set(safetensors) == {"emb_params"} and torch.equal(safetensors["emb_params"], result.embedding.vectors["emb_params"])
    assert not zipfile.is_zipfile(out / "demotok.pt")  # legacy format: AUTOMATIC1111's unpickler accepts it
    a1111 = torch.load(out / "demotok.pt", weights_only=True)
    assert a1111["name"] == "demotok" and a1111["step"] == 60 and a1111["sd_checkpoint"] == bundle.identity
    assert torch.equal(a1111["string_to_param"]["*"], safetensors["emb_params"])
    assert a1111["string_to_token"] == {"*": 265}
    assert sorted(p.name for p in (out / "steps").iterdir()) == [  # every save_every steps, and the final step
        "demotok-20.pt", "demotok-20.safetensors", "demotok-40.pt", "demotok-40.safetensors", "demotok-60.pt", "demotok-60.safetensors"]
    assert torch.equal(load_file(str(out / "steps" / "demotok-60.safetensors"))["emb_params"], safetensors["emb_params"])
    loss = pd.read_csv(out / "loss.csv")
    assert list(loss.columns) == ["step", "loss", "lr", "images_per_s"] and list(loss.step) == list(range(1, 61))


def test_same_seed_same_embedding(demo_prepared, tmp_path):
    from stages.common.models import load_model

    results = []
    for attempt in range(2):
        bundle = load_model("builtin:tiny-sd15")
        examples = load_examples(demo_prepared / "latents", demo_prepared / "caption")
        results.append(train_embedding(bundle, examples, _settings(steps=5, save_every=0), tmp_path / str(attempt)))
    assert torch.equal(results[0].embedding.vectors["emb_params"], results[1].embedding.vectors["emb_params"])

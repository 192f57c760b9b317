"""DreamArtist's APT in tiflow's one loop: a positive and a {run}-neg embedding trained through neg + cfg·(pos − neg)."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stages.common.latents import load_examples
from stages.common.models import load_model
from stages.common.textual_inversion import AptSettings, TextualInversion, negative_starting_point, starting_point
from stages.train.interrupt import TrainingInterrupted
from stages.train.outputs import RunOutputs
from stages.train.resume import ResumeStore
from stages.train.settings import TrainSettings
from stages.train.trainer import Trainer, train_embedding

APT = {"vectors_neg": 3, "init_text_neg": "", "cfg_scale": 3.0, "ema": 0.97}


def _settings(**extra) -> TrainSettings:
    return TrainSettings.from_schema(**{**dict(name="aptok", token="aptok", init_text="toy", vectors=2, steps=6, save_every=3,
                                              learning_rate=0.05, batch_size=2, apt=APT), **extra})


def _examples(demo_prepared):
    return load_examples(demo_prepared / "latents", demo_prepared / "caption")


def test_an_apt_run_updates_both_embeddings_and_nothing_else(demo_prepared, tmp_path):
    bundle = load_model("builtin:tiny-sd15")
    frozen = {name: {k: v.detach().clone() for k, v in getattr(bundle, name).state_dict().items()} for name in ("text_encoder", "unet", "vae")}
    result = train_embedding(bundle, _examples(demo_prepared), _settings(), tmp_path)

    positive, negative = load_file(str(tmp_path / "aptok.safetensors")), load_file(str(tmp_path / "aptok-neg.safetensors"))
    assert positive["emb_params"].shape == (2, 32) and negative["emb_params"].shape == (3, 32)
    start, _ = starting_point(load_model("builtin:tiny-sd15"), "toy", None, 2)
    negative_start = negative_starting_point(load_model("builtin:tiny-sd15"), AptSettings.from_section(APT), seed=0)
    assert not torch.allclose(positive["emb_params"], start["emb_params"]) and not torch.allclose(negative["emb_params"], negative_start["emb_params"])
    assert 0 < negative_start["emb_params"].abs().max() < 0.01  # init_text_neg "" starts at zeros, plus DreamArtist's 1e-3 nudge
    for name, before in frozen.items():
        module = getattr(bundle, name)
        for key, tensor in before.items():
            current = module.state_dict().get(key)
            if current is None:  # the token embedding sits behind the trainable wrapper: its frozen base
                current = module.get_input_embeddings().base_weight
            assert torch.equal(current, tensor), f"{name}.{key} changed"
    # every format, for both, under DreamArtist's names; snapshots too
    assert torch.load(tmp_path / "aptok-neg.pt", weights_only=True)["name"] == "aptok-neg"
    assert sorted(p.name for p in (tmp_path / "steps").glob("*.safetensors")) == [
        "aptok-3-neg.safetensors", "aptok-3.safetensors", "aptok-6-neg.safetensors", "aptok-6.safetensors"]
    assert torch.equal(result.negative.vectors["emb_params"], negative["emb_params"])


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sd2-v"])
def test_the_apt_loss_is_the_guided_prediction_against_the_familys_target(model):
    bundle = load_model(f"builtin:{model}")
    apt = AptSettings.from_section(APT)
    negative_start = negative_starting_point(bundle, apt, seed=0)
    start, _ = starting_point(bundle, "toy", None, 2)
    ti = TextualInversion(bundle, "aptok", start, clip_skip=1, apt=apt, negative_start=negative_start)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([300, 700])
    prompts = ["a photo of aptok", "aptok on a table"]
    with torch.no_grad():
        loss = ti.loss(latents, prompts, noise, t)
        scaled = latents * bundle.family.vae_scaling_factor
        noisy = bundle.scheduler.add_noise(scaled, noise, t)
        pos = bundle.unet(noisy, t, ti.context(prompts)).sample  # two separate passes, not the batched one
        neg = bundle.unet(noisy, t, ti.context(["a photo of aptok-neg", "aptok-neg on a table"])).sample
        target = bundle.scheduler.get_velocity(scaled, noise, t) if bundle.family.prediction_type == "v_prediction" else noise
        expected = F.mse_loss(neg + 3.0 * (pos - neg), target)
        plain = F.mse_loss(pos, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(plain.item(), rel=1e-3)  # the negative embedding is in play


def test_ema_follows_its_formula_over_three_steps(demo_prepared, tmp_path):
    decay = 0.9
    settings = _settings(steps=3, save_every=0, apt={**APT, "ema": decay})
    trainer = Trainer(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, RunOutputs(tmp_path, "aptok"), ResumeStore(None))
    expected = {name: {key: v.detach().clone() for key, v in embedding.items()} for name, embedding in trainer.model.trained.items()}
    raw_after_each_step = []

    def record(*_):
        raw_after_each_step.append({name: {key: v.detach().clone() for key, v in e.items()} for name, e in trainer.model.trained.items()})

    result = trainer.run(reporter=record)
    for raw in raw_after_each_step:
        for name in expected:
            expected[name]["emb_params"] = decay * expected[name]["emb_params"] + (1 - decay) * raw[name]["emb_params"]
    torch.testing.assert_close(result.embedding.vectors["emb_params"], expected["aptok"]["emb_params"], rtol=0, atol=1e-7)
    torch.testing.assert_close(result.negative.vectors["emb_params"], expected["aptok-neg"]["emb_params"], rtol=0, atol=1e-7)
    # the files are the averages, not the last raw vectors (which stay in the resume state)
    assert not torch.allclose(result.embedding.vectors["emb_params"], raw_after_each_step[-1]["aptok"]["emb_params"])


def test_an_interrupted_apt_run_resumes_to_the_same_vectors(demo_prepared, tmp_path):
    settings = _settings(steps=8, save_every=3, latent_sampling="random")
    straight = train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, tmp_path / "straight", tmp_path / "s1")

    def terminate_at_step_5(step, *_):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    out, state = tmp_path / "interrupted", tmp_path / "s2"
    with pytest.raises(TrainingInterrupted):
        train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, out, state, reporter=terminate_at_step_5)
    assert (out / "interrupted" / "aptok-5-neg.safetensors").is_file()
    resumed = train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), settings, out, state)
    assert resumed.resumed_from == 5
    assert torch.equal(resumed.embedding.vectors["emb_params"], straight.embedding.vectors["emb_params"])
    assert torch.equal(resumed.negative.vectors["emb_params"], straight.negative.vectors["emb_params"])


def test_evaluate_renders_with_the_negative_embedding_as_the_negative_prompt(demo_prepared, tmp_path, monkeypatch):
    from stages.evaluate import report
    from stages.evaluate.report import RunToEvaluate, evaluate_run

    train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), _settings(steps=4, save_every=2), tmp_path / "train")
    calls = []
    real_build = report.build_pipeline

    def recording_pipeline(bundle):
        pipeline = real_build(bundle)

        def call(**kwargs):
            calls.append(kwargs)
            return type(pipeline).__call__(pipeline, **kwargs)
        return call

    monkeypatch.setattr(report, "build_pipeline", recording_pipeline)
    run = RunToEvaluate("aptok", "aptok", "captions", tmp_path / "train", demo_prepared / "latents", demo_prepared / "caption",
                        0.0, "toy", None, AptSettings.from_section(APT), 0)
    section = {"prompts": ["a photo of [name]"], "seeds": [1], "steps": 2, "guidance_scale": 3.0, "checkpoint_grid": 0, "grid_steps": [],
               "validation_samples": 4, "validation_seed": 0, "image_loss_timesteps": 2, "clip_model": None}
    metrics = evaluate_run(load_model("builtin:tiny-sd15"), run, section, (64, 64), tmp_path / "eval")

    bundle = load_model("builtin:tiny-sd15")
    final = {name: load_file(str(tmp_path / "train" / f"{name}.safetensors")) for name in ("aptok", "aptok-neg")}
    expected = TextualInversion(bundle, "aptok", final["aptok"], 1, AptSettings.from_section(APT), final["aptok-neg"])
    with torch.no_grad():
        negative, positive = expected.context(["aptok-neg"]), expected.context(["a photo of aptok"])
    grid_call = calls[0]
    assert grid_call["guidance_scale"] == 3.0
    torch.testing.assert_close(grid_call["negative_prompt_embeds"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_call["prompt_embeds"], positive, rtol=0, atol=1e-6)
    assert {p.name for p in (tmp_path / "eval" / "best").glob("*.safetensors")} == {"aptok.safetensors", "aptok-neg.safetensors"}
    assert metrics["best_step"] in (2, 4)


def test_both_files_load_in_diffusers_as_two_embeddings(demo_prepared, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stages.common.builtin import build_builtin_components

    train_embedding(load_model("builtin:tiny-sd15"), _examples(demo_prepared), _settings(steps=2, save_every=0), tmp_path)
    components = build_builtin_components("tiny-sd15")
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.load_textual_inversion(str(tmp_path / "aptok.safetensors"), token="aptok")
    pipeline.load_textual_inversion(str(tmp_path / "aptok-neg.pt"), token="aptok-neg")
    with torch.no_grad():
        positive, negative = pipeline.encode_prompt("a photo of aptok", device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=True, negative_prompt="aptok-neg")

    bundle = load_model("builtin:tiny-sd15")
    vectors = {name: load_file(str(tmp_path / f"{name}.safetensors")) for name in ("aptok", "aptok-neg")}
    ours = TextualInversion(bundle, "aptok", vectors["aptok"], 1, AptSettings.from_section(APT), vectors["aptok-neg"])
    with torch.no_grad():
        torch.testing.assert_close(positive, ours.context(["a photo of aptok"]), rtol=0, atol=1e-6)
        torch.testing.assert_close(negative, ours.context(["aptok-neg"]), rtol=0, atol=1e-6)


def test_apt_on_sdxl_trains_both_encoders_of_both_embeddings(demo_prepared, tmp_path):
    result = train_embedding(load_model("builtin:tiny-sdxl"), _examples(demo_prepared), _settings(steps=2, save_every=0), tmp_path)
    negative = load_file(str(tmp_path / "aptok-neg.safetensors"))
    assert negative["clip_l"].shape == (3, 32) and negative["clip_g"].shape == (3, 64)
    for key in ("clip_l", "clip_g"):
        assert not torch.allclose(result.embedding.vectors[key], result.initial_vectors[key]), key


def test_the_reconstruction_loss_adds_the_l1_of_the_decoded_prediction():
    bundle = load_model("builtin:tiny-sd15")
    apt = AptSettings.from_section({**APT, "reconstruction": True, "reconstruction_weight": 0.5})
    start, _ = starting_point(bundle, "toy", None, 2)
    ti = TextualInversion(bundle, "aptok", start, 1, apt, negative_starting_point(bundle, apt, seed=0))
    generator = torch.Generator().manual_seed(1)
    latents, noise, t = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([200])
    with torch.no_grad():
        total = ti.loss(latents, ["aptok"], noise, t)
        scaled = latents * bundle.family.vae_scaling_factor
        noisy = bundle.scheduler.add_noise(scaled, noise, t)
        prediction = ti.predict(noisy, t, ["aptok"], None)
        alpha = bundle.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()
        scale = bundle.family.vae_scaling_factor
        pixels = F.l1_loss(bundle.vae.decode(x0 / scale).sample, bundle.vae.decode(latents).sample)
        expected = F.mse_loss(prediction, noise) + 0.5 * pixels
    assert total.item() == pytest.approx(expected.item(), rel=1e-5) and pixels.item() > 0


def test_nan_steps_of_an_apt_run_are_skipped_and_never_reach_a_file(demo_prepared, tmp_path):
    from stages.common.latents import LatentExample

    examples = _examples(demo_prepared)
    broken = [LatentExample(e.image, e.mean.clone(), e.logvar, e.caption) for e in examples]
    broken[0].mean[0, 0, 0] = float("nan")
    settings = _settings(steps=6, save_every=0, batch_size=1, max_nan_steps=6, latent_sampling="deterministic")
    result = train_embedding(load_model("builtin:tiny-sd15"), broken, settings, tmp_path)
    assert 0 < result.skipped_steps < 6
    for name in ("aptok", "aptok-neg"):
        assert torch.isfinite(load_file(str(tmp_path / f"{name}.safetensors"))["emb_params"]).all(), name


def test_the_commented_apt_run_in_config_yaml_runs_end_to_end(tmp_path):
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    text = (REPO / "config.yaml").read_text()
    lines = [line.replace("  # ", "  ", 1) for line in text.splitlines() if line.startswith(("  # demoapt:", "  #           apt:"))]
    config = yaml.safe_load(text)
    config["runs"] = yaml.safe_load("\n".join(line[2:] for line in lines))  # the APT run alone, as uncommented
    assert config["runs"]["demoapt"]["apt"]["cfg_scale"] == 3 and config["runs"]["demoapt"]["apt"]["ema"] == 0.97
    config["runs"]["demoapt"].update(steps=20, save_every=10)  # the run as written; fewer steps keep the test short
    config["evaluate"].update(steps=2, seeds=[1], validation_samples=4)  # and a short evaluate: sampling is not what it checks
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "2"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    train = tmp_path / "out" / "train" / "demoapt"
    assert {p.name for p in train.glob("demoapt*")} == {"demoapt.safetensors", "demoapt.pt", "demoapt-neg.safetensors", "demoapt-neg.pt"}
    assert (tmp_path / "out" / "evaluate" / "demoapt" / "best" / "demoapt-neg.safetensors").is_file()

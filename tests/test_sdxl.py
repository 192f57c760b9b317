"""SDXL through the same trainer: both text encoders learn, only the new rows change, size conditioning reaches the
UNet, and the file loads with diffusers' two-encoder call into the exported pipeline."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.common.latents import load_examples
from stages.common.models import load_model
from stages.common.textual_inversion import TextualInversion, starting_point
from stages.train.settings import TrainSettings
from stages.train.trainer import train_embedding

PROMPT = "a photo of xltok on a wooden table"


@pytest.fixture(scope="module")
def sdxl_prepared(tmp_path_factory) -> Path:
    """builtin:demo through preprocess (center crop, with mirrored copies), caption and cache_latents with tiny-sdxl's VAE."""
    from stages.cache_latents.encode import cache_latents
    from stages.cache_latents.settings import CacheSettings
    from stages.caption.captions import write_captions
    from stages.preprocess.prepare import PreprocessSettings, preprocess_folder, resolve_source

    out = tmp_path_factory.mktemp("sdxl_out")
    preprocess_folder(resolve_source("builtin:demo", out), out / "preprocess", PreprocessSettings.from_schema(size=(64, 64), flip=True))
    write_captions(out / "preprocess", out / "caption", "existing")
    bundle = load_model("builtin:tiny-sdxl")
    cache_latents(out / "preprocess", out / "latents", out / "cache" / "latents", bundle.vae, bundle.identity,
                  settings=CacheSettings.from_schema(), flip=True)
    return out


def _settings(**extra) -> TrainSettings:
    return TrainSettings.from_schema(**{**dict(name="xltok", token="xltok", init_text="red toy", vectors=2, steps=6, save_every=0,
                                              learning_rate=0.05, batch_size=2), **extra})


def test_a_tiny_sdxl_run_trains_both_tensors_and_only_the_new_rows(sdxl_prepared, tmp_path):
    bundle = load_model("builtin:tiny-sdxl")
    frozen = {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
              for name, module in (("text_encoder", bundle.text_encoder), ("text_encoder_2", bundle.text_encoder_2), ("unet", bundle.unet))}
    examples = load_examples(sdxl_prepared / "latents", sdxl_prepared / "caption")
    assert all(e.size_condition is not None for e in examples)  # the manifest's crops reach the trainer
    result = train_embedding(bundle, examples, _settings(), tmp_path)

    written = load_file(str(tmp_path / "xltok.safetensors"))
    assert sorted(written) == ["clip_g", "clip_l"]
    assert written["clip_l"].shape == (2, 32) and written["clip_g"].shape == (2, 64)  # tiny-sdxl's CLIP-L and bigG widths
    for key in ("clip_l", "clip_g"):
        assert not torch.allclose(written[key], result.initial_vectors[key]), f"{key} did not learn"
    # each encoder started from its own vocabulary rows for "red toy", not from the other's
    start, _ = starting_point(load_model("builtin:tiny-sdxl"), "red toy", None, 2)
    assert torch.equal(result.initial_vectors["clip_l"], start["clip_l"]) and torch.equal(result.initial_vectors["clip_g"], start["clip_g"])
    # nothing of the model changed: the base vocabularies, every other weight of both encoders, the UNet
    for name, before in frozen.items():
        module = getattr(bundle, name)
        after = module.state_dict()
        for key, tensor in before.items():
            current = after.get(key)
            if current is None:  # the token embedding now sits behind the trainable wrapper: compare its frozen base
                current = module.get_input_embeddings().base_weight
            assert torch.equal(current, tensor), f"{name}.{key} changed"
    assert torch.load(tmp_path / "xltok.pt", weights_only=True).keys() == {"clip_g", "clip_l"}  # the dict AUTOMATIC1111 reads


def test_size_conditioning_and_the_pooled_prompt_reach_the_unet():
    bundle = load_model("builtin:tiny-sdxl")
    start, _ = starting_point(bundle, "toy", None, 1)
    model = TextualInversion(bundle, "xltok", start, clip_skip=1)
    generator = torch.Generator().manual_seed(0)
    latents, noise, t = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([400])
    with torch.no_grad():
        uncropped = model.loss(latents, [PROMPT], noise, t, [(64, 64, 0, 0, 64, 64)])
        default = model.loss(latents, [PROMPT], noise, t, [None])  # unknown: an uncropped image at its own size
        cropped = model.loss(latents, [PROMPT], noise, t, [(300, 200, 40, 0, 64, 64)])
        other_prompt = model.loss(latents, ["a painting of xltok"], noise, t, [(64, 64, 0, 0, 64, 64)])
    assert uncropped.item() == default.item()
    assert cropped.item() != uncropped.item() and other_prompt.item() != uncropped.item()
    conditioning = model.conditioning([PROMPT])
    assert conditioning.context.shape == (1, 77, 32 + 64) and conditioning.pooled.shape == (1, 64)


def test_the_trained_file_loads_in_diffusers_two_encoder_call_into_the_exported_pipeline(sdxl_prepared, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from stages.tools.export import export_builtin

    folder, = export_builtin("builtin:tiny-sdxl", tmp_path / "tiny-sdxl")
    train_embedding(load_model(str(folder)), load_examples(sdxl_prepared / "latents", sdxl_prepared / "caption"),
                    _settings(steps=3), tmp_path / "run")
    state = load_file(str(tmp_path / "run" / "xltok.safetensors"))

    pipeline = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.load_textual_inversion(state["clip_l"], token="xltok", text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer)
    pipeline.load_textual_inversion(state["clip_g"], token="xltok", text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2)
    with torch.no_grad():
        context, _, pooled, _ = pipeline.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)

    ours = TextualInversion(load_model(str(folder)), "xltok", {key: state[key] for key in ("clip_l", "clip_g")}, clip_skip=1)
    with torch.no_grad():
        expected = ours.conditioning([PROMPT])
    assert not torch.allclose(expected.context, TextualInversion(load_model(str(folder)), "xltok", {k: -v for k, v in state.items()},
                                                                 clip_skip=1).conditioning([PROMPT]).context)  # the vectors matter
    torch.testing.assert_close(context, expected.context, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, expected.pooled, rtol=0, atol=1e-5)


def sdxl_demo_config() -> dict:
    """config.yaml with its commented SDXL block switched on, as a user would uncomment it."""
    import yaml

    from conftest import REPO

    text = (REPO / "config.yaml").read_text()
    block = text.split("# --- SDXL")[1].split("# --- end of SDXL")[0]
    # the YAML lines: a section name alone ("# model:") or an indented key; the rest of the block is prose
    lines = [line[2:] for line in block.splitlines() if re.fullmatch(r"# [a-z_]+:\s*", line) or line.startswith("#   ")]
    switched_on = yaml.safe_load("\n".join(lines))
    config = yaml.safe_load(text)
    config.update(model=switched_on["model"], preprocess=switched_on["preprocess"], train={**config["train"], **switched_on["train"]})
    return config


def test_the_commented_sdxl_run_in_config_yaml_runs_end_to_end(tmp_path):
    import subprocess
    import sys

    import yaml

    from conftest import REPO

    config = sdxl_demo_config()
    assert config["model"]["path"] == "builtin:tiny-sdxl" and config["preprocess"]["mode"] == "bucket"
    for run in config["runs"].values():  # the block as written; fewer steps keep the test short
        run.update(steps=20, save_every=10)
    config["evaluate"].update(steps=2, seeds=[1], validation_samples=4)  # a short evaluate: sampling is not what it checks
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "2"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(iter(config["runs"]))
    written = load_file(str(tmp_path / "out" / "train" / run / f"{run}.safetensors"))
    assert sorted(written) == ["clip_g", "clip_l"]
    assert (tmp_path / "out" / "evaluate" / run / "grid.png").is_file()  # rendered with StableDiffusionXLPipeline


def test_sdxl_previews_render_with_the_xl_pipeline_and_carry_both_tensors(sdxl_prepared, tmp_path):
    from PIL import Image

    from stages.common.embedding.read import read_embedding
    from stages.train.outputs import RunOutputs
    from stages.train.preview import make_previewer

    bundle = load_model("builtin:tiny-sdxl")
    settings = _settings(steps=2, preview_every=2, preview={"prompt": "a photo of [name]", "steps": 2, "width": 64, "height": 64})
    previewer = make_previewer(bundle, settings.preview, settings.token, (64, 64), RunOutputs(tmp_path, "xltok"))
    result = train_embedding(bundle, load_examples(sdxl_prepared / "latents", sdxl_prepared / "caption"), settings, tmp_path, preview=previewer)
    preview = RunOutputs(tmp_path, "xltok").preview_path(2)
    assert Image.open(preview).size[0] >= 64
    carried = read_embedding(preview)  # AUTOMATIC1111's embedding-in-PNG, SDXL's two tensors
    for key in ("clip_l", "clip_g"):
        assert torch.equal(carried.vectors[key], result.embedding.vectors[key]), key

"""Original-layout single-file checkpoints: writing, reading, refusing, and the key mapping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.common.builtin import BUILTIN_MODELS, build_builtin_components
from stages.common.checkpoint_layout import CheckpointError, detect_family, load_original_checkpoint, read_checkpoint_state_dict
from stages.tools.checkpoint_write import clip_to_original, save_original_checkpoint, unet_to_original, vae_to_original

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny() -> dict:
    return build_builtin_components("tiny-sd15", seed=3)


def written_single_file(components: dict, name: str, tmp_path_factory) -> Path:
    """The builtin `name`'s components as one original-layout file, as tiflow export-model --single-file writes it."""
    path = tmp_path_factory.mktemp(name) / f"{name}.safetensors"
    save_original_checkpoint(components, path, builtin_name=name)
    return path


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    return written_single_file(tiny, "tiny-sd15", tmp_path_factory)


def assert_same_weights(a: dict, b: dict, parts: tuple[str, ...] = PARTS) -> None:
    for part in parts:
        left, right = a[part].state_dict(), b[part].state_dict()
        assert left.keys() == right.keys(), part
        for key in left:
            assert left[key].dtype == right[key].dtype, (part, key)
            assert torch.equal(left[key], right[key]), (part, key)


# ---------------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_identical(tiny, tiny_file):
    loaded = load_original_checkpoint(tiny_file)
    assert loaded["family"] == "sd1"
    assert set(loaded) == {"tokenizer", "text_encoder", "unet", "vae", "scheduler", "family"}
    assert_same_weights(tiny, loaded)
    # the rebuilt non-persistent buffer and the models work end to end
    ids = loaded["tokenizer"](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = loaded["text_encoder"](ids).last_hidden_state
        assert torch.equal(hidden, tiny["text_encoder"](ids).last_hidden_state)
        out = loaded["unet"](torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=hidden).sample
    assert out.shape == (1, 4, 8, 8)
    assert not loaded["unet"].training and not loaded["text_encoder"].training


def test_written_file_has_the_original_layout(tiny, tiny_file):
    state, metadata = read_checkpoint_state_dict(tiny_file)
    assert metadata[("tiflow_architecture")] == "tiny-sd15" and metadata["tiflow_family"] == "sd1"
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")) for k in state)
    counts = {part: len(tiny[part].state_dict()) for part in PARTS}
    assert len(state) == sum(counts.values())
    c0 = 32  # tiny-sd15's first UNet/VAE width; the deepest level is 64
    assert state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (c0, 32)
    assert state["model.diffusion_model.middle_block.1.proj_in.weight"].shape == (64, 64, 1, 1)
    # SD1.x's deepest up level has no attention, so its upsampler is block slot 1, not 2
    assert state["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (64, 64, 3, 3)
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in state
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight" in state
    assert state["model.diffusion_model.time_embed.0.weight"].shape == (4 * c0, c0)
    assert state["model.diffusion_model.out.2.weight"].shape == (4, c0, 3, 3)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert state["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in state
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state  # full resolution: no upsampler
    assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 32)
    assert not any(k.endswith("position_ids") for k in state)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())


def test_fp16_file_loads_as_fp32_or_as_stored(tiny, tmp_path):
    path = tmp_path / "half.safetensors"
    save_original_checkpoint(tiny, path, builtin_name="tiny-sd15", dtype=torch.float16)
    state, _ = read_checkpoint_state_dict(path)
    assert all(t.dtype == torch.float16 for t in state.values())
    as_fp32 = load_original_checkpoint(path)
    weight = tiny["unet"].conv_in.weight
    assert as_fp32["unet"].conv_in.weight.dtype == torch.float32
    assert torch.equal(as_fp32["unet"].conv_in.weight, weight.half().float())
    assert load_original_checkpoint(path, dtype=None)["unet"].conv_in.weight.dtype == torch.float16


def test_ckpt_with_state_dict_wrapper_loads(tiny, tiny_file, tmp_path):
    state, _ = read_checkpoint_state_dict(tiny_file)
    path = tmp_path / "model.ckpt"
    # extras that released SD1.x checkpoints carry beside the weights, and that loading ignores
    state["betas"] = state["alphas_cumprod"] = torch.linspace(0.1, 0.9, 1000)
    state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(470000)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).expand(1, -1)
    # what ldm/Lightning write; no metadata, so the architecture is found by shape matching
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, path)
    loaded = load_original_checkpoint(path, family="sd1")
    assert_same_weights(tiny, loaded)


def test_save_is_atomic(tiny, tiny_file, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous version")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_original_checkpoint(tiny, path, builtin_name="tiny-sd15")
    assert path.read_bytes() == b"previous version"
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    save_original_checkpoint(tiny, path, builtin_name="tiny-sd15")
    # not a byte comparison: safetensors writes metadata entries in hash-map (random) order
    assert read_checkpoint_state_dict(path)[0].keys() == read_checkpoint_state_dict(tiny_file)[0].keys()
    assert os.listdir(tmp_path) == ["model.safetensors"]


# --------------------------------------------------------------------------------- full size


def meta_state_dicts(spec) -> tuple[dict, dict, dict]:
    """The UNet's, VAE's and first text encoder's state dicts of a full-size spec, on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return (UNet2DConditionModel(**spec.unet).state_dict(), AutoencoderKL(**spec.vae).state_dict(),
                CLIPTextModel(CLIPTextConfig(**spec.text_encoder)).state_dict())


def assert_diffusers_converters_take_it_back(original: dict, spec, unet: dict, vae: dict, text: dict) -> None:
    """diffusers' own converters take our original layout back to exactly the diffusers keys and shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    back_unet = convert_ldm_unet_checkpoint(original, dict(spec.unet))
    assert back_unet.keys() == unet.keys() and all(back_unet[k] is unet[k] for k in unet)
    back_vae = convert_ldm_vae_checkpoint(original, dict(spec.vae))
    assert {k: v.shape for k, v in back_vae.items()} == {k: v.shape for k, v in vae.items()}
    back_text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()}
    assert back_text.keys() == text.keys()


def test_full_size_sd15_mapping_matches_diffusers_converters():
    """The 1 GB SD1.5 mapping, checked on the meta device: shapes only, no memory."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    spec = BUILTIN_MODELS["sd15"]
    unet, vae, text = meta_state_dicts(spec)
    original = {**unet_to_original(unet, 2), **vae_to_original(vae), **clip_to_original(text)}
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    # the tensor counts and a handful of shapes of the released v1-5 checkpoint
    assert sum(k.startswith("model.diffusion_model.") for k in shapes) == 686
    assert sum(k.startswith("first_stage_model.") for k in shapes) == 248
    assert sum(k.startswith("cond_stage_model.") for k in shapes) == 196
    known = {
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.norm_out.weight": (128,),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert infer_diffusers_model_type(original) == "v1"

    assert_diffusers_converters_take_it_back(original, spec, unet, vae, text)


# ----------------------------------------------------------------------------------- families


def test_detect_family_from_key_prefixes():
    unet = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"]
    assert detect_family(unet + ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert detect_family(unet + ["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    sdxl = ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "conditioner.embedders.1.model.ln_final.weight"]
    assert detect_family(unet + sdxl) == "sdxl"


@pytest.mark.parametrize(
    "keys, says",
    [
        (["foo.bar", "baz"], "not a Stable Diffusion checkpoint"),
        ([], "no tensors"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["emb_params"], "embedding"),
        (["clip_l", "clip_g"], "embedding"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "UNet-only"),
        (["down_blocks.0.resnets.0.conv1.weight"], "diffusers"),
    ],
)
def test_detect_family_refuses_what_is_not_a_model(keys, says):
    with pytest.raises(ValueError, match=says):
        detect_family(keys)


def test_lora_given_as_model_names_the_file(tmp_path):
    path = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(CheckpointError, match=r"style_lora\.safetensors.*LoRA"):
        load_original_checkpoint(path)


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-sd2-v"])
def test_sd2_round_trip_through_the_openclip_layout_is_bit_identical(name, tmp_path):
    components = build_builtin_components(name, seed=5)
    path = tmp_path / f"{name}.safetensors"
    save_original_checkpoint(components, path, builtin_name=name)
    state, _ = read_checkpoint_state_dict(path)
    # the OpenCLIP layout real SD2 files have: fused q/k/v, resblocks, the unused projection
    width = components["text_encoder"].config.hidden_size
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert "cond_stage_model.model.text_projection" in state and "cond_stage_model.model.positional_embedding" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)

    loaded = load_original_checkpoint(path)
    assert loaded["family"] == BUILTIN_MODELS[name].family
    assert loaded["tokenizer"].pad_token == "!"  # OpenCLIP pads with "!", not with end-of-text
    assert_same_weights(components, loaded)
    ids = loaded["tokenizer"](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded["text_encoder"](ids).last_hidden_state, components["text_encoder"](ids).last_hidden_state)


def test_an_sd2_file_that_does_not_say_its_prediction_type_is_taken_as_v_with_a_warning(tmp_path, caplog):
    components = build_builtin_components("tiny-sd2", seed=5)
    noted = tmp_path / "noted.safetensors"
    save_original_checkpoint(components, noted, builtin_name="tiny-sd2")
    state, _ = read_checkpoint_state_dict(noted)
    foreign = tmp_path / "downloaded.safetensors"
    save_file(state, foreign)  # as from a model site: no tiflow metadata
    loaded = load_original_checkpoint(foreign)
    assert loaded["family"] == "sd2-v"
    assert "Set model.family: sd2 for a 512-base model" in caplog.text
    assert_same_weights(components, loaded)  # the shapes found the tiny architecture
    assert load_original_checkpoint(foreign, family="sd2")["family"] == "sd2"


def test_family_setting_that_contradicts_the_file(tiny_file):
    with pytest.raises(CheckpointError, match="'sdxl'.*those of sd1"):
        load_original_checkpoint(tiny_file, family="sdxl")
    with pytest.raises(ValueError, match="unknown model family"):
        load_original_checkpoint(tiny_file, family="sd3")


def test_shapes_of_no_known_architecture_are_named(tiny_file, tmp_path):
    state, _ = read_checkpoint_state_dict(tiny_file)
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)  # inpainting-style input
    path = tmp_path / "inpaint.safetensors"
    save_file(state, path)  # no metadata: full size is tried first, then the smaller builtins
    with pytest.raises(CheckpointError, match=r"inpaint\.safetensors does not match the sd15 architecture.*wrong shape"):
        load_original_checkpoint(path)


# ------------------------------------------------------------------------------ unsafe / broken


class _CreatesFile:
    """A pickle payload that runs code on load: it creates a file."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "payload": _CreatesFile(target)}, path)
    for call in (read_checkpoint_state_dict, load_original_checkpoint):
        with pytest.raises(CheckpointError, match=r"evil\.ckpt refused: it needs code execution.*safetensors"):
            call(path)
        assert not target.exists()
    # the payload is live: an unsafe load would have created the file
    torch.load(path, weights_only=False)
    assert target.exists()


def test_missing_path_is_named(tmp_path):
    path = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_original_checkpoint(path)


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.ckpt"])
def test_unreadable_files_are_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"<html>404 not found</html>")  # a download that went wrong
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} is not a readable"):
        read_checkpoint_state_dict(path)


def test_other_inputs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint_state_dict(tmp_path)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint extension"):
        read_checkpoint_state_dict(odd)
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint_state_dict(not_dict)
    empty = tmp_path / "empty.pt"
    torch.save({"state_dict": {}}, empty)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_checkpoint_state_dict(empty)

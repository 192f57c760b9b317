"""SDXL single files: the conditioner.embedders.0/1 layout written and read back, and full size against diffusers' converters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.common.builtin import BUILTIN_MODELS, build_builtin_components
from stages.common.checkpoint_layout import CheckpointError, load_original_checkpoint, read_checkpoint_state_dict
from stages.tools.checkpoint_write import clip_to_original, openclip_to_original, unet_to_original, vae_to_original
from test_checkpoint_layout import (PARTS, assert_diffusers_converters_take_it_back, assert_same_weights, meta_state_dicts,
                                    written_single_file)

SDXL_PARTS = (*PARTS, "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_sdxl() -> dict:
    return build_builtin_components("tiny-sdxl", seed=7)


@pytest.fixture(scope="module")
def tiny_sdxl_file(tiny_sdxl, tmp_path_factory) -> Path:
    return written_single_file(tiny_sdxl, "tiny-sdxl", tmp_path_factory)


def test_sdxl_round_trip_is_bit_identical(tiny_sdxl, tiny_sdxl_file, tmp_path):
    loaded = load_original_checkpoint(tiny_sdxl_file)
    assert loaded["family"] == "sdxl"
    assert set(loaded) == {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "unet", "vae", "scheduler", "family"}
    assert_same_weights(tiny_sdxl, loaded, SDXL_PARTS)
    assert loaded["tokenizer"].pad_token == "<|endoftext|>" and loaded["tokenizer_2"].pad_token == "!"
    # both rebuilt position_ids work; the bigG projection (the UNet's pooled input) came back too
    ids = loaded["tokenizer_2"](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            assert torch.equal(loaded[name](ids).last_hidden_state, tiny_sdxl[name](ids).last_hidden_state), name
        assert torch.equal(loaded["text_encoder_2"](ids).text_embeds, tiny_sdxl["text_encoder_2"](ids).text_embeds)
    assert not loaded["text_encoder_2"].training

    # a downloaded file carries no tiflow metadata: full-size SDXL is tried first, the shapes find tiny-sdxl
    state, _ = read_checkpoint_state_dict(tiny_sdxl_file)
    foreign = tmp_path / "downloaded.safetensors"
    save_file(state, foreign)
    assert_same_weights(tiny_sdxl, load_original_checkpoint(foreign, family="sdxl"), SDXL_PARTS)


def test_written_sdxl_file_has_the_original_layout(tiny_sdxl, tiny_sdxl_file):
    state, metadata = read_checkpoint_state_dict(tiny_sdxl_file)
    assert metadata["tiflow_architecture"] == "tiny-sdxl" and metadata["tiflow_family"] == "sdxl"
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                             "conditioner.embedders.1.model.")) for k in state)
    counts = {part: len(tiny_sdxl[part].state_dict()) for part in SDXL_PARTS}
    # bigG: q/k/v fused (3 weights + 3 biases → 2 per layer), the projection stays, logit_scale is added
    assert len(state) == sum(counts.values()) - 4 * 2 + 1
    unet = "model.diffusion_model."
    # tiny-sdxl: levels 32/64/64 wide, time embedding 128, pooled 64 + 6 size numbers x 8 features
    assert state[unet + "label_emb.0.0.weight"].shape == (128, 64 + 6 * 8)
    assert state[unet + "label_emb.0.2.weight"].shape == (128, 128)
    # no attention in the first level: input block 1 is a bare ResBlock, attention starts at level 1
    assert not any(k.startswith(unet + "input_blocks.1.1.") for k in state)
    assert state[unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (64, 96)
    assert unet + "input_blocks.7.1.transformer_blocks.1.attn1.to_q.weight" in state  # depth 2 at the deepest level
    assert state[unet + "input_blocks.4.1.proj_in.weight"].shape == (64, 64)  # linear projections
    assert unet + "input_blocks.6.0.op.weight" in state and unet + "input_blocks.9.0.op.weight" not in state
    assert unet + "middle_block.1.transformer_blocks.1.norm3.weight" in state
    # up levels 0 and 1 have attention, so their upsamplers are in slot 2; the last level has neither
    assert state[unet + "output_blocks.2.2.conv.weight"].shape == (64, 64, 3, 3)
    assert unet + "output_blocks.5.2.conv.weight" in state
    assert not any(k.startswith((unet + "output_blocks.6.1.", unet + "output_blocks.8.1.", unet + "output_blocks.8.2.")) for k in state)
    assert state[unet + "output_blocks.8.0.skip_connection.weight"].shape == (32, 64, 1, 1)
    assert state["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 32)
    bigG = "conditioner.embedders.1.model."
    assert state[bigG + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert state[bigG + "positional_embedding"].shape == (77, 64) and bigG + "ln_final.weight" in state
    # the real projection, in OpenCLIP's [width, output] orientation (not SD2's identity)
    assert torch.equal(state[bigG + "text_projection"], tiny_sdxl["text_encoder_2"].text_projection.weight.T)
    assert bigG + "logit_scale" in state
    assert not any(k.endswith("position_ids") for k in state)


def test_sdxl_file_without_its_second_text_encoder_is_named(tiny_sdxl_file, tmp_path):
    state, _ = read_checkpoint_state_dict(tiny_sdxl_file)
    path = tmp_path / "half-sdxl.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("conditioner.embedders.1.")}, path)
    with pytest.raises(CheckpointError, match=r"half-sdxl\.safetensors looks like a sdxl checkpoint but lacks the OpenCLIP bigG text encoder "
                                              r"\(conditioner\.embedders\.1\.model\.\*\)"):
        load_original_checkpoint(path)
    refiner = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}, refiner)
    with pytest.raises(CheckpointError, match=r"refiner\.safetensors is an SDXL refiner.*give the SDXL base model"):
        load_original_checkpoint(refiner)
    # an SDXL UNet without its size-conditioning embedding: diffusers' converter would fail on a bare KeyError
    no_label = tmp_path / "no-label-emb.safetensors"
    save_file({k: v for k, v in state.items() if ".label_emb." not in k}, no_label, metadata={"tiflow_architecture": "tiny-sdxl"})
    with pytest.raises(CheckpointError, match=r"does not match the tiny-sdxl architecture.*unet: 1 missing \(model\.diffusion_model\.label_emb\.0\.0\.weight\)"):
        load_original_checkpoint(no_label)


def test_full_size_sdxl_mapping_matches_diffusers_converters():
    """The 7 GB SDXL base mapping, checked on the meta device: shapes only, no memory."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    spec = BUILTIN_MODELS["sdxl"]
    unet, vae, text = meta_state_dicts(spec)
    with torch.device("meta"):
        big_g_model = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
    big_g = big_g_model.state_dict()
    original = {
        **unet_to_original(unet, 2),
        **vae_to_original(vae),
        **clip_to_original(text, prefix="conditioner.embedders.0.transformer."),
        **openclip_to_original(big_g, prefix="conditioner.embedders.1.model."),
    }
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    # the tensor counts of the released sd_xl_base_1.0 (less CLIP-L's position_ids buffer)
    assert sum(k.startswith("model.diffusion_model.") for k in shapes) == 1680
    assert sum(k.startswith("first_stage_model.") for k in shapes) == 248
    assert sum(k.startswith("conditioner.embedders.0.") for k in shapes) == 196
    assert sum(k.startswith("conditioner.embedders.1.") for k in shapes) == 32 * 12 + 6
    known = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_v.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.0.1.transformer_blocks.9.norm3.weight": (1280,),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert not any(".input_blocks.1.1." in k or ".output_blocks.6.1." in k for k in shapes)  # attention-free levels
    assert infer_diffusers_model_type(original) == "xl_base"

    assert_diffusers_converters_take_it_back(original, spec, unet, vae, text)
    back_big_g = convert_open_clip_checkpoint(big_g_model, original, prefix="conditioner.embedders.1.model.")
    assert {k: v.shape for k, v in back_big_g.items()} == {k: v.shape for k, v in big_g.items()}

"""tiflow's files load with diffusers' own load_textual_inversion and give the prompt embeddings tiflow computes."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stages.common.builtin import build_builtin_components
from stages.common.clip_vocab import VOCAB_SIZE, build_clip_tokenizer
from stages.common.embedding.core import Embedding, save_a1111_pt, save_diffusers, save_safetensors
from stages.common.tokens import add_placeholder_tokens, encode_text, expand_trigger, install_trainable_embedding, tokenize_prompts

TRIGGER = "mytok"
PROMPT = "a photo of mytok on a wooden table"


def tiflow_encoding(tokenizer, text_encoder, vectors: torch.Tensor, penultimate: bool = False, pad_with_eos: bool = True) -> torch.Tensor:
    """The context tiflow trains against: placeholder tokens, expanded trigger, tiflow's own encoder call."""
    add_placeholder_tokens(tokenizer, TRIGGER, vectors.shape[0])
    install_trainable_embedding(text_encoder, vectors)
    ids = tokenize_prompts(tokenizer, [expand_trigger(PROMPT, TRIGGER, vectors.shape[0])], pad_with_eos=pad_with_eos)
    with torch.no_grad():
        return encode_text(text_encoder, ids, penultimate=penultimate)[0]


# ------------------------------------------------------------------------------------------- SD1.x


@functools.cache
def _tiny_sd15() -> dict:
    return build_builtin_components("tiny-sd15")


def fresh_sd15() -> dict:
    """tiny-sd15 with its own tokenizer and text encoder (loading an embedding changes both); UNet/VAE shared."""
    base = _tiny_sd15()
    return dict(base, tokenizer=build_clip_tokenizer(), text_encoder=copy.deepcopy(base["text_encoder"]))


@pytest.fixture(scope="module")
def sd_expected():
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)) * 0.5  # tiny-sd15's text width is 32
    components, other = fresh_sd15(), fresh_sd15()
    expected = tiflow_encoding(components["tokenizer"], components["text_encoder"], vectors)
    assert not torch.allclose(expected, tiflow_encoding(other["tokenizer"], other["text_encoder"], -vectors))  # the vectors matter
    return Embedding(TRIGGER, {"emb_params": vectors}, step=10), expected


@pytest.mark.parametrize("writer,filename", [
    (save_safetensors, "mytok.safetensors"),
    (save_a1111_pt, "mytok.pt"),
    (save_diffusers, "learned_embeds.safetensors"),
    (save_diffusers, "learned_embeds.bin"),
])
def test_sd_files_load_in_diffusers_with_tiflows_prompt_embeddings(tmp_path, sd_expected, writer, filename):
    embedding, expected = sd_expected
    path = writer(embedding, tmp_path / filename)[0]
    pipeline = StableDiffusionPipeline(**fresh_sd15(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.load_textual_inversion(str(path), token=TRIGGER)  # as users load it
    with torch.no_grad():
        prompt_embeds, _ = pipeline.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------- SDXL

CLIP_L_WIDTH, CLIP_G_WIDTH, PROJECTION = 32, 48, 32  # different widths: a swapped clip_l/clip_g cannot load


def _clip_config(width: int, act: str, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=1, **extra)


@functools.cache
def _tiny_sdxl_modules() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + PROJECTION, cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, norm_num_groups=1,
    )
    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=32)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": CLIPTextModel(_clip_config(CLIP_L_WIDTH, "quick_gelu")).eval(),
        "text_encoder_2": CLIPTextModelWithProjection(_clip_config(CLIP_G_WIDTH, "gelu", projection_dim=PROJECTION)).eval(),
    }


def tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """An SDXL pipeline of small random components: CLIP-L-like and bigG-like text encoders, real tokenizers.

    Text encoders and tokenizers are fresh copies (loading an embedding changes them); the UNet and VAE are shared.
    """
    modules = _tiny_sdxl_modules()
    return StableDiffusionXLPipeline(
        vae=modules["vae"],
        text_encoder=copy.deepcopy(modules["text_encoder"]),
        text_encoder_2=copy.deepcopy(modules["text_encoder_2"]),
        tokenizer=build_clip_tokenizer(),  # SDXL's first tokenizer pads with <|endoftext|>
        tokenizer_2=build_clip_tokenizer(pad_token="!"),  # the OpenCLIP one pads with "!" (id 0)
        unet=modules["unet"],
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )


@pytest.fixture(scope="module")
def sdxl_expected():
    generator = torch.Generator().manual_seed(2)
    embedding = Embedding(TRIGGER, {"clip_l": torch.randn(2, CLIP_L_WIDTH, generator=generator),
                                    "clip_g": torch.randn(2, CLIP_G_WIDTH, generator=generator)})
    reference = tiny_sdxl_pipeline()
    expected = torch.cat([
        tiflow_encoding(reference.tokenizer, reference.text_encoder, embedding.vectors["clip_l"], penultimate=True, pad_with_eos=True),
        tiflow_encoding(reference.tokenizer_2, reference.text_encoder_2, embedding.vectors["clip_g"], penultimate=True, pad_with_eos=False),
    ], dim=-1)
    return embedding, expected


def _sdxl_prompt_embeds(pipeline: StableDiffusionXLPipeline) -> torch.Tensor:
    with torch.no_grad():
        prompt_embeds, *_ = pipeline.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return prompt_embeds


@pytest.mark.parametrize("writer,filename,read_state", [
    (save_safetensors, "mytok.safetensors", lambda path: load_file(str(path))),
    (save_a1111_pt, "mytok.pt", lambda path: torch.load(path, weights_only=True)),
])
def test_sdxl_two_tensor_files_load_with_the_two_encoder_call(tmp_path, sdxl_expected, writer, filename, read_state):
    embedding, expected = sdxl_expected
    state = read_state(writer(embedding, tmp_path / filename)[0])
    pipeline = tiny_sdxl_pipeline()
    pipeline.load_textual_inversion(state["clip_l"], token=TRIGGER, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer)
    pipeline.load_textual_inversion(state["clip_g"], token=TRIGGER, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2)
    torch.testing.assert_close(_sdxl_prompt_embeds(pipeline), expected, rtol=0, atol=1e-6)


def test_sdxl_diffusers_files_load_per_encoder(tmp_path, sdxl_expected):
    embedding, expected = sdxl_expected
    first, second = save_diffusers(embedding, tmp_path / "learned_embeds.safetensors")
    pipeline = tiny_sdxl_pipeline()
    pipeline.load_textual_inversion(str(first), token=TRIGGER, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer)
    pipeline.load_textual_inversion(str(second), token=TRIGGER, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2)
    torch.testing.assert_close(_sdxl_prompt_embeds(pipeline), expected, rtol=0, atol=1e-6)

"""Built-in random-weight models of the real Stable Diffusion architectures.

No pretrained weights exist offline, so tests, the demo and benchmarks use models that have
the real diffusers/transformers classes, the real CLIP vocabulary and the real file layouts,
with weights drawn from a fixed seed. Throughput does not depend on weight values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.paths import BUILTIN_PREFIX as PREFIX

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

# torch, diffusers and transformers are imported where a model is built: checking a builtin name
# (the workflow's start-up check) must not pay seconds of imports
from stages.common.clip_vocab import EOS_TOKEN, VOCAB_SIZE, build_clip_tokenizer, write_tokenizer_files
from stages.common.errors import InputError


_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class BuiltinSpec:
    """The architecture of one builtin model: diffusers/transformers constructor arguments."""

    family: str
    description: str
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict = field(default_factory=lambda: dict(_SD_SCHEDULER, prediction_type="epsilon"))
    pad_token: str = EOS_TOKEN  # SD2's OpenCLIP tokenizer pads with "!"
    text_encoder_2: dict | None = None  # SDXL's OpenCLIP bigG (a CLIPTextModelWithProjection)
    pad_token_2: str = "!"  # the second tokenizer pads as OpenCLIP does

    @property
    def text_encoder_configs(self) -> dict[str, dict]:
        """The text encoders by their diffusers component name, in the order the UNet's context concatenates them."""
        configs = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            configs["text_encoder_2"] = self.text_encoder_2
        return configs


def _unet(channels: tuple[int, ...], cross_dim: int, head_dim: int | tuple, sample_size: int, **extra) -> dict:
    # SD1.x layout: cross-attention in every level but the deepest, 2 resnets per level
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=cross_dim,
        attention_head_dim=head_dim,
        norm_num_groups=32,
        **extra,
    )


def _vae(channels: tuple[int, ...], sample_size: int) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def _clip_l(hidden: int, layers: int, heads: int, intermediate: int, hidden_act: str = "quick_gelu") -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,  # not 2: the legacy argmax pooling breaks with added tokens
        pad_token_id=1,
    )


def _openclip_h(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    # OpenCLIP ViT-H as diffusers stores SD2's text encoder: a CLIPTextModel with plain gelu,
    # already cut to the penultimate layer (so the last hidden state is what SD2 conditions on)
    return _clip_l(hidden, layers, heads, intermediate, hidden_act="gelu")


def _sd2_unet(channels: tuple[int, ...], cross_dim: int, head_dims: tuple[int, ...], sample_size: int) -> dict:
    # SD2 differs from SD1 in the UNet by linear projections in/out of attention and per-level head sizes
    return _unet(channels, cross_dim, head_dims, sample_size, use_linear_projection=True)


def _sdxl_unet(channels: tuple[int, ...], transformer_layers: tuple[int, ...], head_counts: tuple[int, ...], text_width: int,
               pooled_width: int, time_embed_dim: int) -> dict:
    # SDXL: no attention in the first level, deeper transformers further down, and the "text_time"
    # addition embedding: the pooled prompt plus six size numbers, each turned into time_embed_dim features
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        transformer_layers_per_block=transformer_layers,
        attention_head_dim=head_counts,
        use_linear_projection=True,
        cross_attention_dim=text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
        norm_num_groups=32,
    )


def _openclip_g(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    # OpenCLIP ViT-bigG as SDXL's second text encoder: all layers kept (SDXL reads the penultimate
    # one itself) and a projection whose pooled output the UNet also receives
    return dict(_clip_l(hidden, layers, heads, intermediate, hidden_act="gelu"), projection_dim=hidden)


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    # a few MB: every test and the demo; same block structure as SD1.5, narrow channels
    "tiny-sd15": BuiltinSpec(
        family="sd1",
        description="SD1.5 architecture at toy width (32-64 channels, 32-wide text encoder)",
        unet=_unet((32, 32, 64, 64), cross_dim=32, head_dim=8, sample_size=64),
        vae=_vae((32, 32, 64, 64), sample_size=512),
        text_encoder=_clip_l(hidden=32, layers=2, heads=4, intermediate=64),
    ),
    # mid-sized: CPU benchmarks where the tiny model is all overhead
    "small-sd15": BuiltinSpec(
        family="sd1",
        description="SD1.5 architecture at a quarter of its width",
        unet=_unet((64, 128, 256, 256), cross_dim=192, head_dim=8, sample_size=64),
        vae=_vae((32, 64, 128, 128), sample_size=512),
        text_encoder=_clip_l(hidden=192, layers=4, heads=4, intermediate=768),
    ),
    "tiny-sd2": BuiltinSpec(
        family="sd2",
        description="SD2.x base architecture (OpenCLIP text encoder, linear attention projections) at toy width",
        unet=_sd2_unet((32, 32, 64, 64), cross_dim=32, head_dims=(2, 2, 4, 4), sample_size=64),
        vae=_vae((32, 32, 64, 64), sample_size=512),
        text_encoder=_openclip_h(hidden=32, layers=2, heads=4, intermediate=64),
        pad_token="!",
    ),
    "tiny-sd2-v": BuiltinSpec(
        family="sd2-v",
        description="SD2.x 768-v architecture (v-prediction) at toy width",
        unet=_sd2_unet((32, 32, 64, 64), cross_dim=32, head_dims=(2, 2, 4, 4), sample_size=96),
        vae=_vae((32, 32, 64, 64), sample_size=768),
        text_encoder=_openclip_h(hidden=32, layers=2, heads=4, intermediate=64),
        scheduler=dict(_SD_SCHEDULER, prediction_type="v_prediction"),
        pad_token="!",
    ),
    # the real size (860M UNet, 123M text encoder, 84M VAE): GPU benchmarks and real checkpoints
    "sd15": BuiltinSpec(
        family="sd1",
        description="Stable Diffusion 1.5 at full size",
        unet=_unet((320, 640, 1280, 1280), cross_dim=768, head_dim=8, sample_size=64),
        vae=_vae((128, 256, 512, 512), sample_size=512),
        text_encoder=_clip_l(hidden=768, layers=12, heads=12, intermediate=3072),
    ),
    # SD 2.1 at full size (865M UNet, 340M OpenCLIP-H text encoder cut to 23 layers)
    "sd21": BuiltinSpec(
        family="sd2-v",
        description="Stable Diffusion 2.1 (768-v) at full size",
        unet=_sd2_unet((320, 640, 1280, 1280), cross_dim=1024, head_dims=(5, 10, 20, 20), sample_size=96),
        vae=_vae((128, 256, 512, 512), sample_size=768),
        text_encoder=_openclip_h(hidden=1024, layers=23, heads=16, intermediate=4096),
        scheduler=dict(_SD_SCHEDULER, prediction_type="v_prediction"),
        pad_token="!",
    ),
    # SDXL's structure (3 levels, transformer depth growing downwards, two text encoders, size
    # conditioning) at toy width: the CLIP-L encoder 32 wide, the bigG one 64, so the UNet's context is 96
    "tiny-sdxl": BuiltinSpec(
        family="sdxl",
        description="SDXL architecture (two text encoders, size conditioning) at toy width",
        unet=_sdxl_unet((32, 64, 64), transformer_layers=(1, 1, 2), head_counts=(2, 4, 4), text_width=32 + 64, pooled_width=64, time_embed_dim=8),
        vae=dict(_vae((32, 32, 64, 64), sample_size=1024), scaling_factor=0.13025),
        text_encoder=_clip_l(hidden=32, layers=2, heads=4, intermediate=64),
        text_encoder_2=_openclip_g(hidden=64, layers=2, heads=4, intermediate=128),
    ),
    # SDXL 1.0 base at full size (2.6B UNet, CLIP-L 123M + OpenCLIP bigG 695M, 84M VAE)
    "sdxl": BuiltinSpec(
        family="sdxl",
        description="Stable Diffusion XL 1.0 base at full size",
        unet=_sdxl_unet((320, 640, 1280), transformer_layers=(1, 2, 10), head_counts=(5, 10, 20), text_width=768 + 1280, pooled_width=1280, time_embed_dim=256),
        vae=dict(_vae((128, 256, 512, 512), sample_size=1024), scaling_factor=0.13025, force_upcast=True),
        text_encoder=_clip_l(hidden=768, layers=12, heads=12, intermediate=3072),
        text_encoder_2=_openclip_g(hidden=1280, layers=32, heads=20, intermediate=5120),
    ),
}


def parse_builtin_name(path: str) -> str | None:
    """'builtin:tiny-sd15' → 'tiny-sd15'; anything else → None."""
    if not str(path).startswith(PREFIX):
        return None
    name = str(path)[len(PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise InputError(f"model.path: unknown builtin model {name!r}; available: {', '.join(PREFIX + n for n in BUILTIN_MODELS)}")
    return name


# A freshly initialised UNet all but ignores its text context, so no embedding could change its
# loss. Trained models follow the prompt strongly; drawing the cross-attention value and output
# projections 4x wider (16x the variance) gives random weights that do too. Speed is unaffected.
CROSS_ATTENTION_GAIN = 4.0


def _strengthen_text_conditioning(unet: UNet2DConditionModel) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if name.endswith(("attn2.to_v.weight", "attn2.to_out.0.weight")):
                parameter.mul_(CROSS_ATTENTION_GAIN)


def build_builtin_components(name: str, seed: int = 0) -> dict:
    """Instantiate a builtin model's components with weights drawn from `seed` (same seed → same weights)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    spec = BUILTIN_MODELS[name]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = text_encoder_class("text_encoder")(text_encoder_config(spec.text_encoder))
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**spec.unet)
        _strengthen_text_conditioning(unet)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**spec.vae)
        components = {"tokenizer": build_clip_tokenizer(pad_token=spec.pad_token), "text_encoder": text_encoder.eval()}
        if spec.text_encoder_2 is not None:
            torch.manual_seed(seed + 3)
            text_encoder_2 = text_encoder_class("text_encoder_2")(text_encoder_config(spec.text_encoder_2))
            components.update(tokenizer_2=build_clip_tokenizer(pad_token=spec.pad_token_2), text_encoder_2=text_encoder_2.eval())
    finally:
        torch.random.set_rng_state(generator_state)
    return dict(components, unet=unet.eval(), vae=vae.eval(), scheduler=DDPMScheduler(**spec.scheduler))


def text_encoder_class(component: str):
    """transformers' class for a text-encoder component: SDXL's second encoder carries a projection."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel


def text_encoder_config(kwargs: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**kwargs)


def write_builtin_configs(name: str, folder: Path) -> Path:
    """Write a diffusers folder's configs and tokenizer (no weights) for a builtin architecture.

    Single-file checkpoints carry no configs; these are what loading one offline needs.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = BUILTIN_MODELS[name]
    folder.mkdir(parents=True, exist_ok=True)
    for sub, cls, kwargs in (("unet", UNet2DConditionModel, spec.unet), ("vae", AutoencoderKL, spec.vae)):
        (folder / sub).mkdir(exist_ok=True)
        config = dict(kwargs, _class_name=cls.__name__)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
    for component, kwargs in spec.text_encoder_configs.items():
        (folder / component).mkdir(exist_ok=True)
        text_config = text_encoder_config(kwargs).to_dict()
        text_config["architectures"] = [text_encoder_class(component).__name__]
        (folder / component / "config.json").write_text(json.dumps(text_config, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(spec.scheduler, _class_name="DDPMScheduler"), indent=2))
    write_tokenizer_files(folder / "tokenizer", pad_token=spec.pad_token)
    if spec.text_encoder_2 is not None:
        write_tokenizer_files(folder / "tokenizer_2", pad_token=spec.pad_token_2)
    return folder

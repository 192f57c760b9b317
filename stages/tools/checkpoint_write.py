"""Write diffusers/transformers components as one original-layout (CompVis/ldm) single-file checkpoint.

The diffusers→original key mapping is our own, derived from key structure, so it fits any number
of levels; checkpoint_layout.py loads the files back through diffusers' converters.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from stages.common.builtin import BUILTIN_MODELS
from stages.common.checkpoint_layout import (
    META_ARCHITECTURE,
    META_FAMILY,
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_CLIP_L_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointError,
)
from stages.common.files import atomic_path


# ---------------------------------------------------------------- diffusers → original key mapping

# a diffusers ResnetBlock2D's submodules under their ldm ResBlock names (UNet)
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             # SDXL's text_time addition embedding (pooled prompt + size numbers); add_time_proj has no weights
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK_KEY = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _no_mapping(component: str, key: str) -> CheckpointError:
    return CheckpointError(
        f"{component} parameter {key!r} has no name in the original Stable Diffusion layout; "
        "only SD1.x, SD2.x and SDXL-style models (no other class/addition embeddings) can be saved as an original checkpoint"
    )


def _resnet_rest(rest: str, names: Mapping[str, str], component: str, key: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in names:
        raise _no_mapping(component, key)
    return f"{names[head]}.{tail}"


def unet_to_original(state: Mapping[str, Tensor], layers_per_block: int) -> dict[str, Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to `model.diffusion_model.*` keys.

    ldm numbers its blocks flat: input_blocks.0 is conv_in, then each level has
    `layers_per_block` (resnet, attention) blocks plus one downsampler block; output_blocks have
    `layers_per_block + 1` blocks per level, the upsampler riding in the last one. Levels without
    attention (SD1's deepest, SDXL's first) just leave the attention slot out; SDXL's deeper
    transformers (`transformer_blocks.N`) keep their names. Works on meta tensors too, so the
    full-size mapping can be checked without allocating the model.
    """
    if not isinstance(layers_per_block, int):
        raise CheckpointError(f"UNet layers_per_block={layers_per_block!r}: only one int for all levels maps to the original layout")
    step = layers_per_block + 1
    # the upsampler sits after the attention (index 2) when the level has attention, else at index 1
    up_with_attention = {int(m.group(2)) for k in state if (m := _BLOCK_KEY.fullmatch(k)) and m.group(1) == "up_blocks" and m.group(3) == "attentions"}
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif m := _BLOCK_KEY.fullmatch(key):
            kind, level, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "down_blocks":
                if part == "downsamplers":  # 'conv.weight' → 'op.weight'
                    new = f"input_blocks.{1 + level * step + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
                elif part == "resnets":
                    new = f"input_blocks.{1 + level * step + index}.0.{_resnet_rest(rest, _UNET_RESNET, 'UNet', key)}"
                else:
                    new = f"input_blocks.{1 + level * step + index}.1.{rest}"
            else:
                if part == "upsamplers":
                    slot = 2 if level in up_with_attention else 1
                    new = f"output_blocks.{level * step + layers_per_block}.{slot}.{rest}"
                elif part == "resnets":
                    new = f"output_blocks.{level * step + index}.0.{_resnet_rest(rest, _UNET_RESNET, 'UNet', key)}"
                else:
                    new = f"output_blocks.{level * step + index}.1.{rest}"
        elif m := _MID_KEY.fullmatch(key):
            part, index, rest = m.groups()
            if part == "resnets":  # middle_block = resnet, attention, resnet
                new = f"middle_block.{2 * int(index)}.{_resnet_rest(rest, _UNET_RESNET, 'UNet', key)}"
            else:
                new = f"middle_block.{2 * int(index) + 1}.{rest}"
        else:
            raise _no_mapping("UNet", key)
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state dict to `first_stage_model.*` keys.

    The ldm decoder numbers its levels from the highest resolution (up.0) while diffusers'
    up_blocks start at the lowest, and its mid attention uses 1x1 convolutions where diffusers
    uses linear layers: those weights gain two trailing unit dimensions.
    """
    num_up = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        side, _, rest = key.partition(".")
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif side in ("encoder", "decoder") and rest.startswith(("conv_in.", "conv_out.")):
            new = key
        elif side in ("encoder", "decoder") and rest.startswith("conv_norm_out."):
            new = f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest):
            kind, level, part, index, tail = m.groups()
            level = int(level) if kind == "down" else num_up - 1 - int(level)
            if part == "resnets":
                new = f"{side}.{kind}.{level}.block.{index}.{tail.replace('conv_shortcut.', 'nin_shortcut.')}"
            else:  # 'conv.weight' stays: downsample.conv / upsample.conv
                new = f"{side}.{kind}.{level}.{part[:-8]}sample.{tail}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
            new = f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", rest):
            new = f"{side}.mid.attn_1.{_VAE_ATTENTION[m.group(1)]}.{m.group(2)}"
            if m.group(1) != "group_norm" and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # linear [C, C] → 1x1 conv [C, C, 1, 1]
        else:
            raise _no_mapping("VAE", key)
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_original(state: Mapping[str, Tensor], prefix: str = SD1_TEXT_PREFIX) -> dict[str, Tensor]:
    """Rename a CLIPTextModel state dict to `<prefix>text_model.*` keys (SD1: cond_stage_model.transformer.,
    SDXL's first encoder: conditioner.embedders.0.transformer.).

    transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions had it,
    so both spellings are accepted.
    """
    return {
        f"{prefix}text_model.{key.removeprefix('text_model.')}": tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")  # a constant buffer, not a weight
    }


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_to_original(state: Mapping[str, Tensor], prefix: str = SD2_TEXT_PREFIX) -> dict[str, Tensor]:
    """An OpenCLIP text encoder in transformers' keys as OpenCLIP's own `<prefix>*` keys (SD2:
    cond_stage_model.model., SDXL's bigG: conditioner.embedders.1.model.).

    OpenCLIP keeps q, k and v in one `in_proj` tensor and its projection as a [width, output]
    matrix. SD2's CLIPTextModel has no projection, so the identity is written, as real SD2 files
    carry one that SD never uses; SDXL's CLIPTextModelWithProjection writes its own, transposed.
    The logit scale is only written for the file to look as real ones do (loaders skip it).
    """
    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items() if not key.endswith("position_ids")}
    projection = state.pop("text_projection.weight", None)  # Linear weight [output, width]
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = tensor
            continue
        match = _CLIP_LAYER_KEY.fullmatch(key)
        if not match:
            raise _no_mapping("text encoder", key)
        layer, module, kind = match.groups()
        block = f"{prefix}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":  # q, k, v stacked in that order, as OpenCLIP's attention stores them
                parts = [state[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        if module not in _OPENCLIP_LAYER:
            raise _no_mapping("text encoder", key)
        out[f"{block}{_OPENCLIP_LAYER[module]}.{kind}"] = tensor
    width = state["final_layer_norm.weight"].shape[0]
    out[prefix + "text_projection"] = projection.T if projection is not None else torch.eye(width)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # log(100), OpenCLIP's trained value
    return out


# ------------------------------------------------------------------------------------------ save


def save_original_checkpoint(
    components: dict, path: Path, builtin_name: str | None = None, dtype: torch.dtype = torch.float32
) -> None:
    """Write unet, vae and the text encoder(s) as one original-layout SD1.x, SD2.x or SDXL .safetensors file.

    `builtin_name` goes into the file's metadata so that loading picks the same architecture;
    without it the layout is SDXL's if there is a text_encoder_2, else SD1's.
    Floating-point tensors are stored as `dtype` (fp32, or fp16 for half-size files).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: original checkpoints are written as .safetensors; give a path ending in .safetensors")
    family = "sdxl" if "text_encoder_2" in components else "sd1"
    if builtin_name is not None:
        if builtin_name not in BUILTIN_MODELS:
            raise CheckpointError(f"{path}: unknown builtin architecture {builtin_name!r}; available: {', '.join(BUILTIN_MODELS)}")
        family = BUILTIN_MODELS[builtin_name].family
    if family not in TEXT_WRITERS:
        raise CheckpointError(f"{path}: saving {family} models as one file is not supported; only {', '.join(TEXT_WRITERS)}")
    needed = ("unet", "vae", *TEXT_WRITERS[family])
    missing = [name for name in needed if name not in components]
    if missing:
        raise CheckpointError(f"{path}: components lack {', '.join(missing)}; a single-file {family} checkpoint holds {', '.join(needed)}")

    unet = components["unet"]
    parts = [unet_to_original(unet.state_dict(), unet.config.layers_per_block), vae_to_original(components["vae"].state_dict())]
    parts += [write(components[component].state_dict()) for component, write in TEXT_WRITERS[family].items()]
    tensors: dict[str, Tensor] = {}
    for part in parts:
        for key, tensor in part.items():
            tensor = tensor.detach().to("cpu")
            # safetensors stores raw buffers: they must be contiguous, and only floats change dtype
            tensors[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()

    metadata = {"format": "pt", META_FAMILY: family}
    if builtin_name is not None:
        metadata[META_ARCHITECTURE] = builtin_name
    from safetensors.torch import save_file

    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)


# each family's text encoders by component name, with the writer of their original layout
TEXT_WRITERS: dict[str, dict[str, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]]] = {
    "sd1": {"text_encoder": clip_to_original},
    "sd2": {"text_encoder": openclip_to_original},
    "sd2-v": {"text_encoder": openclip_to_original},
    "sdxl": {"text_encoder": partial(clip_to_original, prefix=SDXL_CLIP_L_PREFIX),
             "text_encoder_2": partial(openclip_to_original, prefix=SDXL_OPENCLIP_PREFIX)},
}

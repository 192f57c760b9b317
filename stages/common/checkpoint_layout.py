"""Single-file Stable Diffusion checkpoints in the original (CompVis/ldm) key layout.

AUTOMATIC1111, ComfyUI and most model sites exchange one .safetensors/.ckpt file whose keys are
those of the original ldm code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.*` or `conditioner.embedders.*` (text encoders). This module writes such files
from diffusers/transformers components and loads them back offline.

Saving uses our own diffusers→original mapping (derived from key structure, so it fits any number
of levels); loading uses diffusers' own converters, so real checkpoints go through the code that
diffusers maintains for them. The two meet in the round-trip tests.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from stages.common.builtin import BUILTIN_MODELS, BuiltinSpec
from stages.common.families import get_family
from stages.common.files import atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders."
META_ARCHITECTURE = "tiflow_architecture"
META_FAMILY = "tiflow_family"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FULL_SIZE_SPEC = {"sd1": "sd15", "sd2": "sd21"}  # architecture assumed for files that don't name theirs


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that can't be used; the message names the file and what to do."""


# ---------------------------------------------------------------- diffusers → original key mapping

# a diffusers ResnetBlock2D's submodules under their ldm ResBlock names (UNet)
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK_KEY = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID_KEY = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _no_mapping(component: str, key: str) -> CheckpointError:
    return CheckpointError(
        f"{component} parameter {key!r} has no name in the original SD1.x layout; "
        "only SD1.x-style models (no class/addition embeddings) can be saved as an original checkpoint"
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
    `layers_per_block + 1` blocks per level, the upsampler riding in the last one. Works on meta
    tensors too, so the full-size mapping can be checked without allocating the model.
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


def clip_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a CLIPTextModel state dict to `cond_stage_model.transformer.text_model.*` keys.

    transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions had it,
    so both spellings are accepted.
    """
    return {
        f"{SD1_TEXT_PREFIX}text_model.{key.removeprefix('text_model.')}": tensor
        for key, tensor in state.items()
        if not key.endswith("position_ids")  # a constant buffer, not a weight
    }


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def openclip_to_original(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An SD2 text encoder (CLIPTextModel weights) as the OpenCLIP `cond_stage_model.model.*` keys.

    OpenCLIP keeps q, k and v in one `in_proj` tensor; the projection and logit scale that SD never
    uses are written as real files carry them (diffusers' loader skips both).
    """
    state = {key.removeprefix("text_model."): tensor for key, tensor in state.items() if not key.endswith("position_ids")}
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key in _OPENCLIP_TOP:
            out[SD2_TEXT_PREFIX + _OPENCLIP_TOP[key]] = tensor
            continue
        match = _CLIP_LAYER_KEY.fullmatch(key)
        if not match:
            raise _no_mapping("text encoder", key)
        layer, module, kind = match.groups()
        prefix = f"{SD2_TEXT_PREFIX}transformer.resblocks.{layer}."
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if module == "self_attn.q_proj":  # q, k, v stacked in that order, as OpenCLIP's attention stores them
                parts = [state[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] for name in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}attn.in_proj_{kind}"] = torch.cat(parts)
            continue
        if module not in _OPENCLIP_LAYER:
            raise _no_mapping("text encoder", key)
        out[f"{prefix}{_OPENCLIP_LAYER[module]}.{kind}"] = tensor
    width = state["final_layer_norm.weight"].shape[0]
    out[SD2_TEXT_PREFIX + "text_projection"] = torch.eye(width)
    out[SD2_TEXT_PREFIX + "logit_scale"] = torch.tensor(4.6052)  # log(100), OpenCLIP's trained value
    return out


# ------------------------------------------------------------------------------------------ save


def save_original_checkpoint(
    components: dict, path: Path, builtin_name: str | None = None, dtype: torch.dtype = torch.float32
) -> None:
    """Write unet, vae and text_encoder as one original-layout SD1.x or SD2.x .safetensors file.

    `builtin_name` goes into the file's metadata so that loading picks the same architecture.
    Floating-point tensors are stored as `dtype` (fp32, or fp16 for half-size files).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: original checkpoints are written as .safetensors; give a path ending in .safetensors")
    family = "sd1"
    if builtin_name is not None:
        if builtin_name not in BUILTIN_MODELS:
            raise CheckpointError(f"{path}: unknown builtin architecture {builtin_name!r}; available: {', '.join(BUILTIN_MODELS)}")
        family = BUILTIN_MODELS[builtin_name].family
    if family not in TEXT_WRITERS:
        raise CheckpointError(f"{path}: saving {family} models as one file is not supported yet; only SD1.x and SD2.x")
    missing = [name for name in ("unet", "vae", "text_encoder") if name not in components]
    if missing:
        raise CheckpointError(f"{path}: components lack {', '.join(missing)}; a single-file checkpoint holds unet, vae and text_encoder")

    unet = components["unet"]
    tensors: dict[str, Tensor] = {}
    for part in (
        unet_to_original(unet.state_dict(), unet.config.layers_per_block),
        vae_to_original(components["vae"].state_dict()),
        TEXT_WRITERS[family](components["text_encoder"].state_dict()),
    ):
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


TEXT_WRITERS = {"sd1": clip_to_original, "sd2": openclip_to_original, "sd2-v": openclip_to_original}


# ------------------------------------------------------------------------------------------ read


def detect_family(keys: Iterable[str]) -> str:
    """'sd1', 'sd2' or 'sdxl' from a single-file checkpoint's key names; ValueError if none fits."""
    keys = list(keys)
    if any(k.startswith(SDXL_TEXT_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        return "sd1"
    raise ValueError(_diagnose(keys))


def _diagnose(keys: list[str]) -> str:
    """Say what a file without a known text-encoder prefix most likely is."""
    if not keys:
        return "it holds no tensors"
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    found = f"{len(keys)} tensors with key prefixes {', '.join(prefixes[:6])}{', ...' if len(prefixes) > 6 else ''}"
    if any("lora_" in k or ".lora_A." in k or ".lora_B." in k or ".hada_" in k for k in keys):
        what = "it looks like a LoRA, which is applied on top of a model, not a model itself"
    elif set(keys) <= {"emb_params", "clip_l", "clip_g"} or any(k.startswith("string_to_param") for k in keys):
        what = "it looks like a textual-inversion embedding, not a model"
    elif any(k.startswith(UNET_PREFIX) for k in keys):
        what = "it has a UNet (model.diffusion_model.*) but no text encoder: a UNet-only file"
    elif any(k.startswith((VAE_PREFIX, "encoder.down.", "decoder.up.")) for k in keys):
        what = "it looks like a standalone VAE"
    elif any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "embeddings.")) for k in keys):
        what = "it is in diffusers/transformers layout (one component); give the diffusers folder instead"
    else:
        what = "it is not a Stable Diffusion checkpoint"
    return (
        f"{what} ({found}); a full checkpoint has cond_stage_model.transformer.* (SD1.x), "
        "cond_stage_model.model.* (SD2.x) or conditioner.embedders.* (SDXL) keys"
    )


def read_checkpoint_state_dict(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a .safetensors file, or the tensors of a .ckpt/.pt pickle.

    Pickles are read only with `weights_only=True`: a file that needs code to load is refused,
    since loading it would run whatever code its author put in.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the model path")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; a single-file checkpoint is one .safetensors or .ckpt file (a diffusers folder loads as a folder)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        state, metadata = _read_pickle(path), {}
    else:
        raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}; expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)}")
    if not state:
        raise CheckpointError(f"{path} holds no tensors; it is not a model checkpoint")
    return state, metadata


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error type for bad headers
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({type(error).__name__}: {error}); "
            "it may be truncated (an interrupted download?) or another format renamed"
        ) from None
    return state, metadata


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        # torch's safe unpickler names what it would have had to run after "WeightsUnpickler error:"
        detail = str(error).partition("WeightsUnpickler error:")[2].strip() or str(error).strip()
        reason = detail.splitlines()[0] if detail else "unknown"
        if reason.startswith("Unsupported operand"):  # bytes that are no pickle at all
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({reason}); it may be damaged or another format renamed") from None
        raise CheckpointError(
            f"{path} refused: it needs code execution to load ({reason}), and running a file's code "
            "can do anything on this machine. Convert it to .safetensors with a tool you trust, "
            "or get a .safetensors version of the model"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated or not a checkpoint at all"
        ) from None
    # Lightning/ldm checkpoints wrap the weights: {"state_dict": {...}, "global_step": ...}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; it is not a model checkpoint")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}


# ------------------------------------------------------------------------------------------ load


def load_original_checkpoint(path: Path, family: str = "auto", dtype: torch.dtype | None = torch.float32) -> dict:
    """Load an original-layout SD1.x or SD2.x single file offline into diffusers/transformers components.

    Returns build_builtin_components' dict (tokenizer, text_encoder, unet, vae, scheduler) plus
    "family". The architecture is the one the file's metadata names, else the family's full-size
    one, else a builtin whose shapes match. `dtype=None` keeps the file's dtypes.
    """
    path = Path(path)
    state, metadata = read_checkpoint_state_dict(path)
    try:
        detected = detect_family(state)
    except ValueError as error:
        raise CheckpointError(f"{path} is not a full Stable Diffusion checkpoint: {error}") from None
    if family != "auto":
        get_family(family)  # rejects unknown names with the list of allowed ones
        if family.split("-")[0] != detected:  # sd2-v files carry sd2 keys
            raise CheckpointError(f"{path}: the model family is set to {family!r} but the file's keys are those of {detected}; set it to {detected!r} or 'auto'")
    if detected not in FULL_SIZE_SPEC:
        raise CheckpointError(
            f"{path} is a {detected} checkpoint: not supported yet: only SD1.x and SD2.x single files load in this version; "
            f"use the model as a diffusers folder instead"
        )
    if not any(k.startswith(UNET_PREFIX) for k in state) or not any(k.startswith(VAE_PREFIX) for k in state):
        raise CheckpointError(f"{path} lacks the UNet (model.diffusion_model.*) or the VAE (first_stage_model.*); it is not a full checkpoint")

    named = metadata.get(META_ARCHITECTURE)
    if named in BUILTIN_MODELS and BUILTIN_MODELS[named].family.split("-")[0] == detected:
        candidates = [named]
    else:  # the usual case for downloaded files: assume full size, then try the smaller builtins
        full = FULL_SIZE_SPEC[detected]
        candidates = [full] + [n for n, s in BUILTIN_MODELS.items() if s.family.split("-")[0] == detected and n != full]
    first_problem = None
    for name in candidates:
        models, problems = _convert_onto(state, BUILTIN_MODELS[name], dtype)
        if not problems:
            return _finish(models, BUILTIN_MODELS[name], _file_family(path, detected, metadata, family))
        first_problem = first_problem or (name, problems)
    name, problems = first_problem
    raise CheckpointError(
        f"{path} does not match the {name} architecture ({BUILTIN_MODELS[name].description}): "
        f"{'; '.join(problems)}. Variants with other shapes (inpainting, other widths) are not supported"
    )


def _file_family(path: Path, detected: str, metadata: dict[str, str], asked: str) -> str:
    """sd1, sd2 or sd2-v. SD2's epsilon and v-prediction weights look alike, so the file's own note,
    or model.family, decides; a file with neither is taken as 768-v, the SD 2.x most fine-tunes use."""
    if detected != "sd2":
        return detected
    if asked != "auto":
        return asked
    noted = metadata.get(META_FAMILY)
    if noted in ("sd2", "sd2-v"):
        return noted
    log.warning("%s: an SD2.x file does not say whether it predicts v (768-v models) or noise (512-base models); "
                "assuming v-prediction. Set model.family: sd2 for a 512-base model", path)
    return "sd2-v"


def _convert_onto(state: dict[str, Tensor], spec: BuiltinSpec, dtype: torch.dtype | None) -> tuple[dict, list[str]]:
    """Convert with diffusers' converters and compare against `spec` built on the meta device.

    Models on the meta device cost no memory or random init (seconds for the full size);
    `load_state_dict(assign=True)` then makes the checkpoint's tensors their parameters.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel(**spec.unet),
            "vae": AutoencoderKL(**spec.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**spec.text_encoder)),
        }
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        text = convert_open_clip_checkpoint(models["text_encoder"], state)
    else:
        text = convert_ldm_clip_checkpoint(state)  # keys 'text_model.*' (the pre-5.6 transformers layout)
    if not hasattr(models["text_encoder"], "text_model"):
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
    converted = {
        "unet": convert_ldm_unet_checkpoint(state, dict(spec.unet)),
        "vae": convert_ldm_vae_checkpoint(state, dict(spec.vae)),
        "text_encoder": {k: v for k, v in text.items() if not k.endswith("position_ids") and k != "text_projection.weight"},
    }
    problems = []
    for part, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted[part].items() if v is not None}
        missing = sorted(expected.keys() - got.keys())
        unexpected = sorted(got.keys() - expected.keys())
        shapes = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                problems.append(f"{part}: {len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        return {}, problems
    for part, model in models.items():
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in converted[part].items()}
        model.load_state_dict(tensors, strict=True, assign=True)
    return models, []


def _finish(models: dict, spec: BuiltinSpec, family: str) -> dict:
    """Restore what the meta device left empty and add the parts a checkpoint doesn't carry."""
    from diffusers import DDPMScheduler

    from stages.common.clip_vocab import build_clip_tokenizer

    text_encoder = models["text_encoder"]
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
    # position_ids is a non-persistent buffer (never in a state dict): rebuild the constant
    embeddings.position_ids = torch.arange(text_encoder.config.max_position_embeddings).expand((1, -1))
    for part, model in models.items():
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{part} tensors left unloaded on the meta device: {', '.join(left[:5])}")
        model.eval()
    return {
        "tokenizer": build_clip_tokenizer(pad_token=spec.pad_token),
        "text_encoder": text_encoder,
        "unet": models["unet"],
        "vae": models["vae"],
        "scheduler": DDPMScheduler(**spec.scheduler),
        "family": family,
    }

"""Single-file Stable Diffusion checkpoints in the original (CompVis/ldm) key layout.

AUTOMATIC1111, ComfyUI and most model sites exchange one .safetensors/.ckpt file whose keys are
those of the original ldm code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.*` or `conditioner.embedders.*` (text encoders). This module reads such files
and loads them offline into diffusers/transformers components, through diffusers' own converters,
so real checkpoints go through the code that diffusers maintains for them. checkpoint_write.py
writes them; the two meet in the round-trip tests.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from stages.common.builtin import BUILTIN_MODELS, BuiltinSpec
from stages.common.families import get_family
from stages.common.errors import InputError, MissingInput

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # transformers' CLIPTextModel layout, as SD1
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG, in OpenCLIP's own layout
META_ARCHITECTURE = "tiflow_architecture"
META_FAMILY = "tiflow_family"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FULL_SIZE_SPEC = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # architecture assumed for files that don't name theirs


log = logging.getLogger(__name__)


class CheckpointError(InputError):
    """A checkpoint file that can't be used; the message names the file and what to do."""


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
    raise InputError(_diagnose(keys))


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
        raise MissingInput(f"checkpoint {path} does not exist; check the model path")
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

# what each family's file must hold, by key prefix: (what, prefix)
REQUIRED_PARTS = {
    "sd1": (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("text encoder", SD1_TEXT_PREFIX)),
    "sd2": (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("text encoder", SD2_TEXT_PREFIX)),
    "sdxl": (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX), ("CLIP-L text encoder", SDXL_CLIP_L_PREFIX),
             ("OpenCLIP bigG text encoder", SDXL_OPENCLIP_PREFIX)),
}
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder is bigG, in slot 0


def load_original_checkpoint(path: Path, family: str = "auto", dtype: torch.dtype | None = torch.float32) -> dict:
    """Load an original-layout SD1.x, SD2.x or SDXL single file offline into diffusers/transformers components.

    Returns build_builtin_components' dict (tokenizer, text_encoder, and for SDXL tokenizer_2 and
    text_encoder_2, unet, vae, scheduler) plus "family". The architecture is the one the file's
    metadata names, else the family's full-size one, else a builtin whose shapes match.
    `dtype=None` keeps the file's dtypes.
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
    _check_parts(path, state, detected)

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


def _check_parts(path: Path, state: dict[str, Tensor], detected: str) -> None:
    """Refuse a file that lacks a component its family needs, naming the missing key prefixes."""
    if detected == "sdxl" and any(k.startswith(SDXL_REFINER_PREFIX) for k in state) and not any(k.startswith(SDXL_CLIP_L_PREFIX) for k in state):
        raise CheckpointError(
            f"{path} is an SDXL refiner checkpoint (one OpenCLIP text encoder at {SDXL_REFINER_PREFIX}*); "
            "the refiner only polishes images and takes no embeddings: give the SDXL base model"
        )
    missing = [f"the {what} ({prefix}*)" for what, prefix in REQUIRED_PARTS[detected] if not any(k.startswith(prefix) for k in state)]
    if missing:
        raise CheckpointError(
            f"{path} looks like a {detected} checkpoint but lacks {' and '.join(missing)}; it is not a full checkpoint. "
            "Use a file that holds the whole model, or the model as a diffusers folder"
        )


def _file_family(path: Path, detected: str, metadata: dict[str, str], asked: str) -> str:
    """sd1, sd2, sd2-v or sdxl. SD2's epsilon and v-prediction weights look alike, so the file's own note,
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


def _convert_text(state: dict[str, Tensor], models: dict) -> dict[str, dict[str, Tensor]]:
    """The text encoders' weights in transformers' keys, by component name."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if any(k.startswith(SDXL_TEXT_PREFIX) for k in state):
        # convert_ldm_clip_checkpoint strips conditioner.embedders.0.transformer. as well as SD1's prefix
        texts = {
            "text_encoder": convert_ldm_clip_checkpoint(state),
            "text_encoder_2": convert_open_clip_checkpoint(models["text_encoder_2"], state, prefix=SDXL_OPENCLIP_PREFIX),
        }
    elif any(k.startswith(SD2_TEXT_PREFIX) for k in state):
        texts = {"text_encoder": convert_open_clip_checkpoint(models["text_encoder"], state)}
    else:
        texts = {"text_encoder": convert_ldm_clip_checkpoint(state)}  # keys 'text_model.*' (the pre-5.6 transformers layout)
    converted = {}
    for component, text in texts.items():
        model = models[component]
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel, not ...WithProjection
            text = {k.removeprefix("text_model."): v for k, v in text.items()}
        # SD2's OpenCLIP projection is unused (CLIPTextModel has none); SDXL's bigG keeps it for the pooled prompt
        converted[component] = {
            k: v for k, v in text.items()
            if not k.endswith("position_ids") and (k != "text_projection.weight" or hasattr(model, "text_projection"))
        }
    return converted


def _convert_onto(state: dict[str, Tensor], spec: BuiltinSpec, dtype: torch.dtype | None) -> tuple[dict, list[str]]:
    """Convert with diffusers' converters and compare against `spec` built on the meta device.

    Models on the meta device cost no memory or random init (seconds for the full size);
    `load_state_dict(assign=True)` then makes the checkpoint's tensors their parameters.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from stages.common.builtin import text_encoder_class, text_encoder_config

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**spec.unet), "vae": AutoencoderKL(**spec.vae)}
        for component, kwargs in spec.text_encoder_configs.items():
            models[component] = text_encoder_class(component)(text_encoder_config(kwargs))
    converted = {}
    for part, convert, prefix in (("unet", convert_ldm_unet_checkpoint, UNET_PREFIX), ("vae", convert_ldm_vae_checkpoint, VAE_PREFIX)):
        try:
            converted[part] = convert(state, dict(getattr(spec, part)))
        except KeyError as error:  # diffusers indexes some keys (SDXL's label_emb.*) without checking
            return {}, [f"{part}: 1 missing ({prefix}{error.args[0]})"]
    converted.update(_convert_text(state, models))
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

    components = {}
    for component, pad_token in (("text_encoder", spec.pad_token), ("text_encoder_2", spec.pad_token_2)):
        if component not in models:
            continue
        text_encoder = models[component]
        embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings
        # position_ids is a non-persistent buffer (never in a state dict): rebuild the constant
        embeddings.position_ids = torch.arange(text_encoder.config.max_position_embeddings).expand((1, -1))
        components[component.replace("text_encoder", "tokenizer")] = build_clip_tokenizer(pad_token=pad_token)
        components[component] = text_encoder
    for part, model in models.items():
        left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"{part} tensors left unloaded on the meta device: {', '.join(left[:5])}")
        model.eval()
    return dict(components, unet=models["unet"], vae=models["vae"], scheduler=DDPMScheduler(**spec.scheduler), family=family)

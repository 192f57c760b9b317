"""Running a WD14-style ONNX tagger: its session, its input size, and the images as it expects them."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state
from PIL import Image, UnidentifiedImageError
from stages.common.errors import InputError

log = logging.getLogger(__name__)

# onnxruntime raises its own exception classes (not ValueError/OSError) for bad model files and inputs
ORT_ERRORS = tuple(getattr(_ort_state, name) for name in ("Fail", "InvalidProtobuf", "InvalidGraph", "NoSuchFile", "InvalidArgument",
                                                           "NotImplemented", "RuntimeException") if hasattr(_ort_state, name))

DEFAULT_SIDE = 448  # every WD14 tagger's input; used only when a model leaves its size dynamic


@dataclass
class TaggerModel:
    path: Path
    session: ort.InferenceSession
    input_name: str
    side: int  # the square input side the model was exported with
    fixed_batch: int | None  # a model exported with a fixed batch dimension takes exactly this many images
    output_width: int | None  # scores per image, when the model states it

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()


def choose_providers(device: str) -> list[str]:
    """CUDA when asked for or available (device=auto), else the CPU."""
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise InputError(f"caption.tagger.device: cuda, but this onnxruntime has no CUDA provider (available: {', '.join(available)}); "
                         "install onnxruntime-gpu or use device: auto")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_tagger(path: Path, threads: int = 0, device: str = "auto") -> TaggerModel:
    """Load the model and read its input layout; refuse models that do not take NHWC float images."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0 = onnxruntime's default (one per core)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # onnxruntime's warnings go to stderr otherwise
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=choose_providers(device))
    except ORT_ERRORS as exc:
        raise InputError(f"caption.tagger.model: onnxruntime cannot load {path} ({_first_line(exc)}); give a WD14-style tagger's model.onnx") from None
    model_input = session.get_inputs()[0]
    shape = list(model_input.shape)
    if model_input.type != "tensor(float)" or len(shape) != 4 or shape[3] != 3:
        raise InputError(f"caption.tagger.model: {path} takes {model_input.type} of shape {shape}; a WD14-style tagger takes "
                         "float images as [batch, height, width, 3] (NHWC, BGR)")
    height, width = shape[1], shape[2]
    if isinstance(height, int) and isinstance(width, int):
        if height != width:
            raise InputError(f"caption.tagger.model: {path} takes {width}x{height} images; WD14-style taggers take square ones")
        side = height
    else:
        log.warning("%s leaves its input size open (%s); using the WD14 size %d", path, shape, DEFAULT_SIDE)
        side = DEFAULT_SIDE
    output_shape = session.get_outputs()[0].shape
    output_width = output_shape[-1] if output_shape and isinstance(output_shape[-1], int) else None
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    log.info("tagger %s: %dx%d input, providers %s", path.name, side, side, ", ".join(session.get_providers()))
    return TaggerModel(path, session, model_input.name, side, fixed_batch, output_width)


def prepare_image(image: Image.Image, side: int) -> np.ndarray:
    """An image as WD14 taggers take it: padded to a square on white, resized, BGR, float32 0-255, HWC.

    Follows the model author's reference code (SmilingWolf's wd-tagger app): transparency is
    composited on white, the square is padded evenly on both sides, and the resize is bicubic.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        image = canvas
    image = image.convert("RGB")
    square = max(image.size)
    padded = Image.new("RGB", (square, square), (255, 255, 255))
    padded.paste(image, ((square - image.width) // 2, (square - image.height) // 2))
    if square != side:
        padded = padded.resize((side, side), Image.BICUBIC)
    rgb = np.asarray(padded, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])  # RGB → BGR, the channel order the models were trained on


def load_tagger_input(path: Path, side: int) -> np.ndarray:
    """Read one image file for the tagger; an unreadable one is an error naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return prepare_image(image, side)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"caption.tagger: cannot read {path} ({exc}); rerun preprocess to rewrite it, or remove it from the dataset") from None


def run_tagger(model: TaggerModel, batch: np.ndarray) -> np.ndarray:
    """Scores [images, tags] for a batch [images, side, side, 3]; a fixed-batch model gets padded batches."""
    count = len(batch)
    if model.fixed_batch and count != model.fixed_batch:
        padding = np.zeros((model.fixed_batch - count, *batch.shape[1:]), dtype=batch.dtype)
        batch = np.concatenate([batch, padding])
    try:
        scores = model.session.run(None, {model.input_name: batch})[0]
    except ORT_ERRORS as exc:
        raise InputError(f"caption.tagger.model: {model.path} failed on a batch of {count} image(s) ({_first_line(exc)})") from None
    return np.asarray(scores, dtype=np.float32).reshape(len(batch), -1)[:count]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

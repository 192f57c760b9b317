"""DeepDanbooru as AUTOMATIC1111 runs it: the network, its weights file, and the images as it takes them.

The webui's modules/deepbooru_model.py (from AUTOMATIC1111/TorchDeepDanbooru) spells the network
out as 179 convolutions, n_Conv_0 … n_Conv_178, and one max-pool. It is a bottleneck ResNet with
TensorFlow-style padding: a 7×7 stem, then five stages of 1×1 → 3×3 → 1×1 blocks, and a 1×1
convolution to one score per tag, averaged over the map and put through a sigmoid. This module
builds the same layers from a table, with the same names, so model-resnet_custom_v3.pt loads
as it is (the weights plus a 'tags' list, in one torch.save dict).
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from stages.common.errors import InputError

SIDE = 512  # the webui resizes every picture to 512×512 for DeepDanbooru
BASE_WIDTH = 64  # the stem's channels in the real model; tests build narrower copies
TAG_COUNT = 9176  # tags in model-resnet_custom_v3.pt
_KEY = "caption.deepbooru.model"

# The stages in units of BASE_WIDTH: (bottleneck width, output width, blocks). Each stage's first
# block projects its input (stride 2 after the first stage). The third stage has a second projecting
# block at `mid`; its projection is numbered after the block's three convolutions, as the webui's are.
_STAGES = [(1, 4, 3, None), (2, 8, 8, None), (4, 16, 40, 20), (8, 32, 3, None), (16, 64, 3, None)]


@dataclass(frozen=True)
class ConvSpec:
    index: int  # n_Conv_{index}
    c_in: int
    c_out: int
    kernel: int
    stride: int
    bias: bool = True


@dataclass(frozen=True)
class Block:
    first: int  # index of the block's first 1×1 convolution; the 3×3 and the last 1×1 follow it
    stride: int  # of the 3×3 convolution and of the projection
    projection: int | None  # index of the shortcut's 1×1 convolution; None = the identity


def deepbooru_layout(base: int = BASE_WIDTH, tags: int = TAG_COUNT) -> tuple[list[ConvSpec], list[Block]]:
    """Every convolution of the network with its index, in the webui's numbering, and the residual blocks."""
    convs, blocks = [ConvSpec(0, 3, base, 7, 2)], []
    c_in = base
    for stage, (width, out, count, mid) in enumerate(_STAGES):
        width, out = width * base, out * base
        for number in range(count):
            stride = 2 if (number == 0 and stage > 0) or number == mid else 1
            projection = None
            if number == 0:  # numbered before the block's convolutions
                projection = len(convs)
                convs.append(ConvSpec(projection, c_in, out, 1, stride))
            first = len(convs)
            convs += [ConvSpec(first, c_in, width, 1, 1), ConvSpec(first + 1, width, width, 3, stride), ConvSpec(first + 2, width, out, 1, 1)]
            if number == mid:  # numbered after them
                projection = len(convs)
                convs.append(ConvSpec(projection, c_in, out, 1, stride))
            blocks.append(Block(first, stride, projection))
            c_in = out
    convs.append(ConvSpec(len(convs), c_in, tags, 1, 1, bias=False))
    return convs, blocks


HEAD_INDEX = len(deepbooru_layout(1, 1)[0]) - 1  # n_Conv_178: the last convolution gives the tag scores


class DeepDanbooruModel(nn.Module):
    """AUTOMATIC1111's DeepDanbooruModel, layer for layer: [N, H, W, 3] floats in [0, 1] → [N, tags] sigmoid scores."""

    def __init__(self, base: int = BASE_WIDTH, tags: int = TAG_COUNT):
        super().__init__()
        self.tags: list[str] = []
        convs, self.blocks = deepbooru_layout(base, tags)
        for spec in convs:  # padding is applied by hand in forward, as TensorFlow's 'same' padding did it
            setattr(self, f"n_Conv_{spec.index}", nn.Conv2d(spec.c_in, spec.c_out, spec.kernel, stride=spec.stride, bias=spec.bias))
        self.n_MaxPool_0 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.head = convs[-1].index

    def conv(self, index: int) -> nn.Conv2d:
        return getattr(self, f"n_Conv_{index}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)  # NHWC, as the webui feeds it → NCHW
        x = F.relu(self.n_Conv_0(F.pad(x, [2, 3, 2, 3])))
        x = self.n_MaxPool_0(F.pad(x, [0, 1, 0, 1], value=float("-inf")))
        for block in self.blocks:
            shortcut = x if block.projection is None else self.conv(block.projection)(x)
            h = F.relu(self.conv(block.first)(x))
            h = F.pad(h, [1, 1, 1, 1] if block.stride == 1 else [0, 1, 0, 1])  # stride 2: right and bottom only
            h = F.relu(self.conv(block.first + 1)(h))
            x = F.relu(self.conv(block.first + 2)(h) + shortcut)
        logits = self.conv(self.head)(x)
        logits = F.avg_pool2d(logits, kernel_size=logits.shape[-2:]).squeeze(3).squeeze(2)  # the mean over the map
        return torch.sigmoid(logits)


def read_weights_only(path: Path, key: str = _KEY) -> object:
    """torch.load(weights_only=True): tensors, containers and strings come back; any other object is refused unbuilt.

    A .pt file is a pickle, and an ordinary pickle can run any code while it loads. The
    weights-only unpickler builds nothing outside its allow-list, so a hostile file fails here
    before anything in it runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # the weights-only unpickler's verdict on a callable reads "... Unsupported global: GLOBAL builtins.exec was not an allowed global ..."
        refused = next((line[line.find("Unsupported global"):].split(". ")[0] for line in lines if "Unsupported global" in line), None)
        detail = next((line[line.find("Unsupported"):].split(". ")[0] for line in lines if "Unsupported" in line), lines[0])
        if refused:
            raise InputError(f"{key}: {path} was refused: it holds objects other than tensors, numbers, strings and lists ({refused}), "
                             "and tiflow runs no code from a model file. Use the model-resnet_custom_v3.pt that AUTOMATIC1111 downloads "
                             "(github.com/AUTOMATIC1111/TorchDeepDanbooru, releases)") from None
        raise InputError(f"{key}: {path} is not a PyTorch weights file ({detail}); give DeepDanbooru's model-resnet_custom_v3.pt") from None


def load_deepbooru(path: Path, device: torch.device) -> DeepDanbooruModel:
    """The network of a model-resnet_custom_v3.pt-style file, its width and tag count read from the file, in eval mode on `device`."""
    state = read_weights_only(path)
    if not isinstance(state, dict) or "n_Conv_0.weight" not in state:
        found = ", ".join(list(map(str, state))[:4]) if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{_KEY}: {path} is not a DeepDanbooru state dict (no n_Conv_0.weight; found {found}); "
                         "give AUTOMATIC1111's model-resnet_custom_v3.pt")
    tags = state.pop("tags", None)
    if not isinstance(tags, list) or not tags or not all(isinstance(tag, str) for tag in tags):
        raise InputError(f"{_KEY}: {path} has no 'tags' list of names; AUTOMATIC1111's model-resnet_custom_v3.pt carries its 9,176 tags in it")
    stem, head = state["n_Conv_0.weight"], state.get(f"n_Conv_{HEAD_INDEX}.weight")
    base = int(stem.shape[0]) if stem.ndim == 4 else 0
    if head is None or base < 1 or head.ndim != 4 or head.shape[0] != len(tags):
        count = "no head" if head is None else f"a head of {int(head.shape[0])} outputs"
        raise InputError(f"{_KEY}: {path} has {count} for {len(tags)} tags; give model-resnet_custom_v3.pt as the webui downloads it")
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = DeepDanbooruModel(base, len(tags))
    expected = model.state_dict()
    wrong = [f"{name}: {tuple(state[name].shape)}, expected {tuple(tensor.shape)}" for name, tensor in expected.items()
             if name in state and tuple(state[name].shape) != tuple(tensor.shape)]
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or extra:
        problem = "; ".join(filter(None, [", ".join(wrong[:3]), missing and f"missing {', '.join(missing[:3])}",
                                          extra and f"unexpected {', '.join(extra[:3])}"]))
        raise InputError(f"{_KEY}: {path} does not fit DeepDanbooru's network ({problem}); give model-resnet_custom_v3.pt")
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, assign=True)
    model.tags = tags
    return model.requires_grad_(False).eval().to(device)


def resize_and_fill(image: Image.Image, width: int = SIDE, height: int = SIDE) -> Image.Image:
    """AUTOMATIC1111's images.resize_image(2, ...), 'Resize and fill', with no upscaler (Lanczos).

    The picture is fitted inside the frame and centred; the bands left over are filled by
    stretching its edge rows (or columns) outwards.
    """
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    framed = Image.new("RGB", (width, height))
    framed.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        framed.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
        framed.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)), box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        framed.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
        framed.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)), box=(fill_width + src_w, 0))
    return framed


def load_deepbooru_input(path: Path) -> np.ndarray:
    """One image as the webui's tag_multi feeds it: RGB, resize-and-fill to 512×512, float32 in [0, 1], HWC."""
    try:
        with Image.open(path) as image:
            framed = resize_and_fill(image.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"caption.deepbooru: cannot read {path} ({exc}); rerun preprocess to rewrite it, or remove it from the dataset") from None
    return np.array(framed, dtype=np.float32) / 255


@torch.inference_mode()
def run_deepbooru(model: DeepDanbooruModel, batch: np.ndarray) -> np.ndarray:
    """Scores [images, tags] for a batch [images, 512, 512, 3]."""
    device = next(model.parameters()).device
    return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

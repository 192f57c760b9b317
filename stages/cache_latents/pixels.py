"""Preprocessed PNGs as VAE input: size checks and [-1, 1] tensors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from stages.common.errors import InputError, MissingInput


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; a size the VAE cannot take is an error naming the file."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise MissingInput(f"{path} is listed in the preprocess manifest but missing; rerun the preprocess stage") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc}); rerun the preprocess stage") from None
    if width % 8 or height % 8:
        raise InputError(f"{path}: {width}x{height} is not a multiple of 8 on both sides, which the VAE needs; rerun the preprocess stage")
    return width, height


def image_to_tensor(path: Path, flip: bool) -> torch.Tensor:
    """An image as a [3, H, W] float32 tensor in [-1, 1] (pixel / 127.5 - 1), mirrored left to right if `flip`."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32)
    tensor = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
    return tensor.flip(-1) if flip else tensor

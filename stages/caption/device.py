"""Where the torch caption models run: CUDA when asked for or available, else the CPU (as the tagger picks its provider)."""
from __future__ import annotations

import torch

from stages.common.errors import InputError


def pick_device(setting: str, key: str) -> torch.device:
    """`setting` is auto, cpu or cuda; `key` is the config key an impossible choice names."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key}: cuda, but this torch sees no GPU (torch {torch.__version__}); install a CUDA build of torch or use device: auto")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")

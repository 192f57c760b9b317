"""The optimizer for the embedding's vectors, and the learning rate at each step."""
from __future__ import annotations

import logging

import torch

from stages.common.schedule import learning_rate_at, parse_learning_rate, schedule_factor

log = logging.getLogger(__name__)


def build_optimizer(params: list[torch.nn.Parameter], kind: str, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused where the device supports it) or bitsandbytes' 8-bit AdamW."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError("train.optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes); or use adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=1.0, weight_decay=weight_decay)
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=1.0, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=1.0, weight_decay=weight_decay)


class LearningRate:
    """AUTOMATIC1111 rate (constant or "rate:step, ...") times warm-up and decay shape."""

    def __init__(self, learning_rate: float | str, kind: str, warmup_steps: int, total_steps: int):
        self.schedule = parse_learning_rate(learning_rate)
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def at(self, step: int) -> float:
        base = learning_rate_at(self.schedule, step, self.total_steps)
        return base * schedule_factor(self.kind, step, self.total_steps, self.warmup_steps)

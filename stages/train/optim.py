"""The optimizer for the embedding's vectors, and the learning rate at each step."""
from __future__ import annotations

import logging

import torch

from stages.common.schedule import learning_rate_at, parse_learning_rate, schedule_end, schedule_factor
from stages.common.errors import InputError

log = logging.getLogger(__name__)


def build_optimizer(params: list[torch.nn.Parameter], kind: str, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused where the device supports it) or bitsandbytes' 8-bit AdamW."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise InputError("train.optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes); or use adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=1.0, weight_decay=weight_decay)
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=1.0, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=1.0, weight_decay=weight_decay)


class LearningRate:
    """AUTOMATIC1111 rate (constant or "rate:step, ...") times warm-up and decay shape.

    Steps are AUTOMATIC1111's: absolute, counted from the embedding's very first step, so a run
    that continues an embedding at step `start_step` (init_from) continues its schedule too, and
    `total_steps` is where it ends (Max steps), not how many more to take. Warm-up and decay, which
    AUTOMATIC1111 does not have, shape this training's own steps (from start_step to end).
    """

    def __init__(self, learning_rate: float | str, kind: str, warmup_steps: int, total_steps: int, start_step: int = 0):
        self.schedule = parse_learning_rate(learning_rate)
        self.kind, self.warmup_steps, self.total_steps, self.start_step = kind, warmup_steps, total_steps, start_step
        self.end = schedule_end(self.schedule, total_steps)  # absolute: where training stops

    @property
    def steps_to_take(self) -> int:
        return self.end - self.start_step

    def at(self, step: int) -> float:
        """The rate of this training's step `step` (0-based, counted from start_step)."""
        base = learning_rate_at(self.schedule, self.start_step + step, self.total_steps)
        return base * schedule_factor(self.kind, step, self.steps_to_take, self.warmup_steps)

"""Learning-rate schedules: a constant, or AUTOMATIC1111's "rate:step, rate:step, rate" syntax."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleStep:
    rate: float
    until_step: float | None  # None: to the end; a value < 1 is a fraction of the total steps


def parse_learning_rate(value: float | int | str) -> list[ScheduleStep]:
    """Parse a learning rate the way AUTOMATIC1111's Train tab does.

    "0.05:100, 0.01:1000, 0.005" → 0.05 until step 100, 0.01 until step 1000, then 0.005.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a schedule string, found {value!r}")
    if isinstance(value, (int, float)):
        if not value > 0:
            raise ValueError(f"must be positive, found {value}")
        return [ScheduleStep(float(value), None)]
    pieces = [p.strip() for p in str(value).split(",") if p.strip()]
    if not pieces:
        raise ValueError("empty schedule; write a number like 0.005 or 'rate:step, ..., rate'")
    steps: list[ScheduleStep] = []
    for index, piece in enumerate(pieces):
        rate_text, _, step_text = piece.partition(":")
        try:
            rate = float(rate_text)
            until = float(step_text) if step_text.strip() else None
        except ValueError:
            raise ValueError(f"cannot read {piece!r}: each entry is 'rate:step' (the last may be just 'rate'), e.g. '0.05:100, 0.005'") from None
        if rate <= 0:
            raise ValueError(f"rate in {piece!r} must be positive")
        if until is None and index != len(pieces) - 1:
            raise ValueError(f"only the last entry may omit its step, found {piece!r}")
        steps.append(ScheduleStep(rate, until))
    return steps


def learning_rate_at(schedule: list[ScheduleStep], step: int, total_steps: int) -> float:
    """The rate for optimizer step `step` (0-based) of `total_steps`."""
    for entry in schedule:
        if entry.until_step is None:
            return entry.rate
        until = entry.until_step * total_steps if entry.until_step < 1 else entry.until_step
        if step < until:
            return entry.rate
    return schedule[-1].rate  # past the last bound: AUTOMATIC1111 keeps the last rate


def schedule_factor(kind: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier on the base rate: linear warm-up, then constant, cosine or linear decay to zero."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"train.lr_scheduler: unknown schedule {kind!r}; use constant, cosine or linear")

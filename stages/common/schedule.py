"""Learning-rate schedules: a constant, or AUTOMATIC1111's "rate:step, rate:step, rate" syntax."""
from __future__ import annotations

import math
from dataclasses import dataclass
from stages.common.errors import InputError


@dataclass(frozen=True)
class ScheduleStep:
    rate: float
    until_step: float | None  # None (no bound, or AUTOMATIC1111's -1): to the end; a value < 1 is a fraction of `steps`


def parse_learning_rate(value: float | int | str) -> list[ScheduleStep]:
    """Parse a learning rate the way AUTOMATIC1111's Train tab does.

    "0.05:100, 0.01:1000, 0.005" → 0.05 until step 100, 0.01 until step 1000, then 0.005.
    "0.05:100, 0.01:1000" → the same, and training stops at step 1000, as in AUTOMATIC1111.
    A bound of -1 means "until the end". Bounds are absolute steps and must increase.
    """
    if isinstance(value, bool):
        raise InputError(f"expected a number or a schedule string, found {value!r}")
    if isinstance(value, (int, float)):
        if not value > 0:
            raise InputError(f"must be positive, found {value}")
        return [ScheduleStep(float(value), None)]
    pieces = [p.strip() for p in str(value).split(",") if p.strip()]
    if not pieces:
        raise InputError("empty schedule; write a number like 0.005 or 'rate:step, ..., rate'")
    steps: list[ScheduleStep] = []
    for index, piece in enumerate(pieces):
        rate_text, _, step_text = piece.partition(":")
        try:
            rate = float(rate_text)
            until = float(step_text) if step_text.strip() else None
        except ValueError:
            raise InputError(f"cannot read {piece!r}: each entry is 'rate:step' (the last may be just 'rate'), e.g. '0.05:100, 0.005'") from None
        if rate <= 0:
            raise InputError(f"rate in {piece!r} must be positive")
        if until == -1:
            until = None  # AUTOMATIC1111: -1 trains at this rate until the end
        elif until is not None and until <= 0:
            raise InputError(f"step in {piece!r} must be positive, or -1 for 'until the end'")
        if until is None and index != len(pieces) - 1:
            raise InputError(f"only the last entry may omit its step (or use -1), found {piece!r}: the entries after it would never be reached")
        steps.append(ScheduleStep(rate, until))
    bounds = [s.until_step for s in steps if s.until_step is not None]
    if any(b >= 1 for b in bounds) and any(b < 1 for b in bounds):
        raise InputError("mix of step numbers and fractions of steps; write every bound one way, e.g. '0.05:100, 0.005:500'")
    if bounds != sorted(set(bounds)):
        raise InputError(f"the steps must increase from entry to entry, found {', '.join(f'{b:g}' for b in bounds)}")
    return steps


def _bound(entry: ScheduleStep, total_steps: int) -> float | None:
    if entry.until_step is None:
        return None
    return entry.until_step * total_steps if entry.until_step < 1 else entry.until_step


def schedule_end(schedule: list[ScheduleStep], total_steps: int) -> int:
    """The step training stops at: `total_steps`, or the last bound when the schedule ends before it.

    AUTOMATIC1111 stops training when its schedule runs out ("0.05:100, 0.01:1000" trains 1000
    steps whatever Max steps says); a last entry without a bound, or with -1, runs to the end.
    """
    last = _bound(schedule[-1], total_steps)
    return total_steps if last is None else min(total_steps, math.ceil(last))


def learning_rate_at(schedule: list[ScheduleStep], step: int, total_steps: int) -> float:
    """The rate for optimizer step `step` (0-based, counted from the embedding's first step) of `total_steps`."""
    for entry in schedule:
        until = _bound(entry, total_steps)
        if until is None or step < until:
            return entry.rate
    return schedule[-1].rate  # past the last bound only when asked directly: training has stopped there


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
    raise InputError(f"train.lr_scheduler: unknown schedule {kind!r}; use constant, cosine or linear")

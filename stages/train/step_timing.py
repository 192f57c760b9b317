"""What a training step costs on this machine: a few real steps of the real trainer, timed, before the real run.

The steps run on made-up latents of the run's largest bucket (the most memory a step can take),
with the run's own batch size, precision and options, so the time and peak memory are measured,
not guessed from a table. Nothing is saved.
"""
from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stages.common.latents import LatentExample
from stages.common.layout import PIXELS_PER_LATENT
from stages.common.models import ModelBundle
from stages.train.outputs import RunOutputs
from stages.train.resume import ResumeStore
from stages.train.settings import TrainSettings
from stages.train.trainer import Trainer

WARMUP_STEPS = 1  # the first step allocates buffers and picks kernels: slower than the rest, not timed
TIMED_STEPS = 3


@dataclass(frozen=True)
class StepTiming:
    device: str
    dtype: str  # what the frozen model computed in (precision: auto resolved)
    latent_size: tuple[int, int]  # (height, width) the steps ran at: the largest bucket
    step_seconds: list[float]  # each timed step, as measured
    peak_memory_bytes: int
    memory_kind: str  # what peak_memory_bytes counts: the GPU's allocations, or the process's resident memory on a CPU

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.step_seconds)


def measure_steps(bundle: ModelBundle, settings: TrainSettings, latent_size: tuple[int, int], timed: int = TIMED_STEPS,
                  warmup: int = WARMUP_STEPS, clock: Callable[[], float] = time.perf_counter) -> StepTiming:
    """Run warmup + timed optimizer steps of `settings` on `bundle` (which it changes: load a fresh one to train)."""
    channels = bundle.unet.config.in_channels
    height, width = latent_size
    generator = torch.Generator().manual_seed(0)
    factor = PIXELS_PER_LATENT
    examples = [LatentExample(f"timing-{i}.png", torch.randn((channels, height, width), generator=generator),
                              torch.full((channels, height, width), -4.0), caption="a photo",
                              size_condition=(height * factor, width * factor, 0, 0, height * factor, width * factor))
                for i in range(settings.batch_size * settings.grad_accum)]
    # no previews, no snapshots: only the step itself; steps high enough that the schedule never ends early
    quiet = dataclasses.replace(settings, preview_every=0, save_every=0, tensorboard=False, validation_split=0.0,
                                steps=settings.steps + warmup + timed, lr_warmup_steps=0)
    with tempfile.TemporaryDirectory(prefix="tiflow-timing-") as scratch:
        trainer = Trainer(bundle, examples, quiet, RunOutputs(Path(scratch), settings.name), ResumeStore(None))
        on_gpu = trainer.device.type == "cuda"
        for _ in range(warmup):
            trainer.train_step()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(timed):
            started = clock()
            trainer.train_step()
            if on_gpu:
                torch.cuda.synchronize()  # the GPU works asynchronously: the step ends when its kernels do
            seconds.append(clock() - started)
        if on_gpu:
            peak, kind = torch.cuda.max_memory_allocated(), "GPU memory allocated by torch"
        else:
            peak, kind = _process_peak_bytes(), "the training process's peak resident memory"
    return StepTiming(trainer.device.type, str(trainer.dtype).removeprefix("torch."), (height, width), seconds, int(peak), kind)


def _process_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes

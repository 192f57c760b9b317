"""Progress for people: a bar with loss, rate, speed and ETA, and optional TensorBoard scalars."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm
from stages.common.errors import InputError


class ProgressReporter:
    """Called once per optimizer step with (step, loss, lr, images/s); the bar appears when training begins,
    so what is logged before (loading, resuming) stays on lines of its own."""

    def __init__(self, description: str, tensorboard_dir: Path | None = None):
        self.description, self.bar, self.writer, self.last_step = description, None, None, 0
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("train.tensorboard: needs the tensorboard package (pip install tensorboard); or set it to false") from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def begin(self, total_steps: int, done_steps: int) -> None:
        """The steps this training takes (the schedule may end before train.steps), and those a resume skips."""
        self.bar = tqdm(total=total_steps, initial=done_steps, desc=self.description, unit="step")
        self.last_step = done_steps

    def __call__(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.bar is None:
            self.begin(0, 0)
        self.bar.update(step - self.last_step)  # jumps over resumed steps
        self.last_step = step
        total = self.bar.total or 0
        if total and (step * 10 // total) > ((step - 1) * 10 // total):  # a plain line every 10%: the log file's progress
            tqdm.write(f"{self.bar.desc}: step {step}/{total}, loss {loss:.4f}, lr {lr:.2e}, {images_per_s:.2f} images/s", file=self.bar.fp)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.2f}", refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

"""The Textual Inversion training loop, the same for every model family."""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stages.common.embedding.core import Embedding
from stages.common.latents import LatentExample, once_sample, sample_latent
from stages.common.models import ModelBundle
from stages.common.prompts import augment_caption, build_prompt, load_template
from stages.common.textual_inversion import (
    ComputeOptions,
    TextualInversion,
    fixed_probe,
    negative_starting_point,
    pick_device,
    prepare_modules,
    probe_loss,
    probe_prompts,
    starting_point,
)
from stages.train.interrupt import TrainingInterrupted, stop_on_signals
from stages.train.optim import LearningRate, build_optimizer
from stages.train.order import BatchOrder
from stages.train.outputs import RunOutputs
from stages.train.resume import ResumeStore
from stages.train.settings import TrainSettings
from stages.train.streams import RandomStreams
from stages.common.errors import InputError

log = logging.getLogger(__name__)

STATE_VERSION = 3  # the resume state's layout (3: vectors by embedding name and key, APT's EMA); another version starts over instead of failing


@dataclass
class TrainResult:
    embedding: Embedding
    initial_vectors: dict[str, torch.Tensor]  # by embedding key, as Embedding.vectors
    negative: Embedding | None = None  # APT: the {run}-neg embedding written beside it
    losses: list[float] = field(default_factory=list)
    probe_loss_start: float = float("nan")  # loss on fixed noise and timesteps, before the first step
    probe_loss_end: float = float("nan")  # the same after the last step: comparable, unlike step losses
    resumed_from: int = 0
    skipped_steps: int = 0


class NonFiniteLoss(RuntimeError):
    """Too many steps gave NaN/inf: the run stops rather than save a broken embedding."""


class Trainer:
    """One run: its random streams, optimizer and counters, all restorable from the resume store."""

    def __init__(self, bundle: ModelBundle, examples: list[LatentExample], settings: TrainSettings, outputs: RunOutputs,
                 store: ResumeStore, start_vectors: dict[str, torch.Tensor] | None = None, start_step: int = 0):
        self.bundle, self.examples, self.settings, self.outputs, self.store = bundle, examples, settings, outputs, store
        self.device = pick_device()
        if start_vectors is None:  # no init_from read by the caller: init_text's words (or init_from's file)
            start_vectors, start_step = starting_point(bundle, settings.init_text, settings.init_from, settings.vectors)
        negative_start = negative_starting_point(bundle, settings.apt, settings.seed) if settings.apt else None
        self.model = TextualInversion(bundle, settings.token, start_vectors, settings.clip_skip, settings.apt, negative_start)
        options = ComputeOptions(settings.precision, settings.gradient_checkpointing, settings.channels_last, settings.compile, settings.deterministic)
        self.dtype = prepare_modules(bundle, options, self.device)
        # the frozen encoders may now be fp16/bf16, which rounded the vectors they hold; the trained
        # vectors stay fp32 (the master copy) and start from the unrounded starting vectors
        for name, embedding in self.model.trained.items():
            for key, vectors in embedding.items():
                vectors.data = self.model.starts[name][key].detach().clone().to(device=self.device, dtype=torch.float32)
        self.optimizer = build_optimizer(self.model.parameters, settings.optimizer, settings.weight_decay, self.device)
        # APT's moving average of both embeddings (DreamArtist's EMA); the files are written from it
        self.ema = ({name: {key: v.detach().clone() for key, v in embedding.items()} for name, embedding in self.model.trained.items()}
                    if settings.apt and settings.apt.ema else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.rate = LearningRate(settings.learning_rate, settings.lr_scheduler, settings.lr_warmup_steps, settings.steps, start_step)
        if self.rate.steps_to_take <= 0:
            raise InputError(f"train.steps: {settings.steps} is not past step {start_step}, where init_from's embedding already is; "
                             f"steps count from the embedding's first step (AUTOMATIC1111's Max steps), so set steps above {start_step}")
        if self.rate.end < settings.steps:
            log.warning("the learning-rate schedule %r ends at step %d, before steps: %d; training stops there, as in AUTOMATIC1111. "
                        "End the schedule with a plain rate (or rate:-1) to train until steps", settings.learning_rate, self.rate.end, settings.steps)
        self.template = load_template(settings.template)
        self.streams = RandomStreams(settings.seed)
        self.order = BatchOrder([e.latent_size for e in examples], settings.batch_size, settings.repeats, self.streams.data_order)
        for size, count in self.order.small_buckets().items():
            log.warning("only %d images of latent size %dx%d (with repeats), fewer than batch_size %d: their batches hold %d, "
                        "as in kohya's buckets", count, size[1], size[0], settings.batch_size, count)
        self.generator = torch.Generator().manual_seed(self.streams.noise)
        self.caption_rng = random.Random(self.streams.captions)
        self.step, self.base_step, self.skipped, self.log_rows = 0, start_step, 0, []
        self.probe = fixed_probe(examples, min(16, 2 * len(examples)), self.streams.probe, bundle.scheduler.config.num_train_timesteps)
        self.probe_prompts = probe_prompts(self.template, examples, settings.token)
        self.probe_start = float("nan")

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step, "base_step": self.base_step, "skipped": self.skipped, "vectors": _cpu(self.model.trained), "ema": _cpu(self.ema) if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "order": self.order.state_dict(),
            "generator": self.generator.get_state(), "caption_rng": self.caption_rng.getstate(),
            "log_rows": self.log_rows, "probe_start": self.probe_start, "settings": asdict(self.settings),
            "version": STATE_VERSION,
        }

    def load_state_dict(self, state: dict) -> None:
        for name, vectors in state["vectors"].items():
            self.model.load_vectors(vectors, str(self.store.path), name)
        if self.ema is not None:
            self.ema = {name: {key: v.to(self.device) for key, v in embedding.items()} for name, embedding in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.order.load_state_dict(state["order"])
        self.generator.set_state(state["generator"])
        self.caption_rng.setstate(_as_random_state(state["caption_rng"]))
        self.step, self.base_step, self.skipped = state["step"], state["base_step"], state["skipped"]
        self.log_rows, self.probe_start = list(state["log_rows"]), state["probe_start"]

    def save_checkpoint(self, interrupted: bool = False) -> None:
        """Snapshot embedding (steps/, or interrupted/ for a stop signal's) and the full state in the resume store."""
        step = self.base_step + self.step
        # AUTOMATIC1111 names snapshots name-N (DreamArtist's negative: name-N-neg)
        for snapshot in self.model.current_embeddings(f"{self.settings.name}-{step}", step, self.ema):
            (self.outputs.save_interrupted if interrupted else self.outputs.save_snapshot)(snapshot)
        self.outputs.write_loss_log(self.log_rows)
        self.store.save(self.state_dict())

    # -- one optimizer step ----------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, list[str], list]:
        indices = self.order.next_batch()  # all of one latent size
        latents = torch.stack([
            sample_latent(self.examples[i], self.settings.latent_sampling, self.generator,
                          once_sample(self.examples[i], i, self.streams.once_samples) if self.settings.latent_sampling == "once" else None)
            for i in indices
        ])
        prompts = []
        for i in indices:
            s = self.settings
            caption = augment_caption(self.examples[i].caption, self.caption_rng, s.shuffle_tags, s.keep_tokens, s.tag_dropout, s.caption_dropout)
            line = self.caption_rng.choice(self.template) if self.template else None
            prompts.append(build_prompt(line, caption, s.token))
        return latents, prompts, [self.examples[i].size_condition for i in indices]

    def train_step(self) -> float:
        """Accumulate gradients over grad_accum batches, then one optimizer step. Returns the loss (NaN if skipped)."""
        lr = self.rate.at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else contextlib.nullcontext()
        step_loss = 0.0
        for _ in range(self.settings.grad_accum):
            latents, prompts, sizes = self._batch()
            noise = torch.randn(latents.shape, generator=self.generator)  # eps ~ N(0, I)
            timesteps = torch.randint(0, self.bundle.scheduler.config.num_train_timesteps, (len(prompts),), generator=self.generator)
            with autocast:
                loss = self.model.loss(latents.to(self.device), prompts, noise.to(self.device), timesteps.to(self.device), sizes)
            self.scaler.scale(loss / self.settings.grad_accum).backward()
            step_loss += loss.item() / self.settings.grad_accum
        self.scaler.unscale_(self.optimizer)
        grads = [v.grad for v in self.model.parameters if v.grad is not None]
        if not math.isfinite(step_loss) or (not all(torch.isfinite(g).all() for g in grads) and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()  # closes this step for the loss scaler (and lowers its scale); without it the next unscale_ fails
            return float("nan")
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)  # with fp16 loss scaling, an overflowed step is skipped here
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = self.settings.apt.ema
            with torch.no_grad():
                for name, embedding in self.model.trained.items():
                    for key, vectors in embedding.items():
                        self.ema[name][key].mul_(decay).add_(vectors.detach(), alpha=1 - decay)  # ema = d·ema + (1 − d)·vectors
        return step_loss

    # -- the run ------------------------------------------------------------------------------
    def run(self, reporter=None, preview=None) -> TrainResult:
        s = self.settings
        if math.isnan(self.probe_start):
            self.probe_start = probe_loss(self.model, self.examples, self.probe, self.probe_prompts)
        resumed_from = self.step
        if reporter is not None and hasattr(reporter, "begin"):
            reporter.begin(self.rate.steps_to_take, self.step)
        started, steps_timed = time.perf_counter(), 0
        self.outputs.write_loss_log(self.log_rows)  # the rows so far (a resume's too); each step appends its own
        with stop_on_signals() as stop:
            while self.step < self.rate.steps_to_take:
                loss = self.train_step()
                if math.isnan(loss):
                    self.skipped += 1
                    log.warning("step %d: loss or gradient is NaN/inf; step skipped, vectors unchanged (%d/%d)",
                                self.step + 1, self.skipped, s.max_nan_steps)
                    if self.skipped >= s.max_nan_steps:
                        raise NonFiniteLoss(
                            f"{self.skipped} steps gave NaN/inf loss; stopping without saving. Lower train.learning_rate, "
                            "use precision fp32/bf16, or check the latent cache for a broken image")
                self.step += 1
                steps_timed += 1
                speed = steps_timed * s.batch_size * s.grad_accum / (time.perf_counter() - started)
                lr = self.rate.at(self.step - 1)
                self.log_rows.append({"step": self.base_step + self.step, "loss": loss, "lr": lr, "images_per_s": speed})
                self.outputs.append_loss_row(self.log_rows[-1])
                if reporter:
                    reporter(self.step, loss, lr, speed)
                if preview and s.preview_every and self.step % s.preview_every == 0:
                    preview(self.model, self.base_step + self.step)
                if stop.requested:
                    self.save_checkpoint(interrupted=True)
                    raise TrainingInterrupted(self.base_step + self.step, stop.signal_name)
                if s.save_every and self.step % s.save_every == 0 and self.step < self.rate.steps_to_take:
                    self.save_checkpoint()
        finals = self.model.current_embeddings(s.name, self.rate.end, self.ema)
        self.outputs.save_final(finals, self.model.current_embeddings(f"{s.name}-{self.rate.end}", self.rate.end, self.ema), self.log_rows)
        final = finals[0]
        self.store.save(self.state_dict())  # a deleted output can be rewritten from here without training
        return TrainResult(
            embedding=final, initial_vectors=self.model.initial, negative=finals[1] if len(finals) > 1 else None,
            losses=[row["loss"] for row in self.log_rows],
            probe_loss_start=self.probe_start, probe_loss_end=probe_loss(self.model, self.examples, self.probe, self.probe_prompts),
            resumed_from=resumed_from, skipped_steps=self.skipped,
        )


def _cpu(vectors: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {key: v.detach().cpu().clone() for key, v in embedding.items()} for name, embedding in vectors.items()}


def _as_random_state(state) -> tuple:
    """random.setstate wants tuples; a saved state may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def train_embedding(
    bundle: ModelBundle,
    examples: list[LatentExample],
    settings: TrainSettings,
    out_dir: Path,
    state_dir: Path | None = None,
    start_vectors: dict[str, torch.Tensor] | None = None,
    start_step: int = 0,
    reporter=None,
    preview=None,
) -> TrainResult:
    """Train one embedding (resuming from `state_dir` when it holds this run's state) and write its files."""
    store = ResumeStore(state_dir)
    trainer = Trainer(bundle, examples, settings, RunOutputs(out_dir, settings.name), store, start_vectors, start_step)
    state = store.load()
    if state is not None and state.get("version") != STATE_VERSION:
        log.warning("the saved state %s is from an older tiflow; training starts over", store.path)
        state = None
    if state is not None and state["step"] <= trainer.rate.steps_to_take:
        trainer.load_state_dict(state)
        log.info("resuming %s from step %d of %d (%s)", settings.name, trainer.base_step + trainer.step, trainer.rate.end, store.path)
    else:
        if state is not None:
            log.warning("the saved state is at step %d, past the end at step %d; training starts over",
                        trainer.base_step + state["step"], trainer.rate.end)
        trainer.outputs.set_aside_earlier_snapshots()  # a new training: steps/ holds only its own snapshots
    return trainer.run(reporter, preview)

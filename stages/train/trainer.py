"""The Textual Inversion training loop, the same for every model family."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from stages.common.embedding import Embedding, save_embedding_files
from stages.common.files import write_csv_atomic
from stages.common.models import ModelBundle
from stages.common.schedule import learning_rate_at, parse_learning_rate
from stages.common.tokens import (
    add_placeholder_tokens,
    encode_prompt_ids,
    expand_trigger,
    initial_vectors,
    install_trainable_embedding,
    tokenize_prompts,
)
from stages.train.dataset import LatentExample, sample_latent
from stages.train.prompts import build_prompt, load_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    name: str
    token: str
    init_text: str = "*"
    vectors: int = 1
    template: str = "captions"
    learning_rate: float | str = 0.005
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    save_every: int = 500
    seed: int = 0
    latent_sampling: str = "deterministic"
    clip_skip: int = 1

    @classmethod
    def from_section(cls, section: dict, clip_skip: int = 1) -> "TrainSettings":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in section.items() if k in known}, clip_skip=clip_skip)


@dataclass
class TrainResult:
    embedding: Embedding
    initial_vectors: torch.Tensor
    losses: list[float] = field(default_factory=list)
    probe_loss_start: float = float("nan")  # loss on fixed noise and timesteps, before the first step
    probe_loss_end: float = float("nan")  # the same after the last step: comparable, unlike step losses


class TextualInversion:
    """The frozen model plus the embedding's trainable vectors, and the loss that trains them."""

    def __init__(self, bundle: ModelBundle, settings: TrainSettings):
        self.bundle, self.settings = bundle, settings
        self.token_ids = add_placeholder_tokens(bundle.tokenizer, settings.token, settings.vectors)
        base_weight = bundle.text_encoder.get_input_embeddings().weight
        self.initial = initial_vectors(bundle.tokenizer, base_weight, settings.init_text, settings.vectors)
        self.embedding = install_trainable_embedding(bundle.text_encoder, self.initial)
        self._ids_cache: dict[str, torch.Tensor] = {}

    @property
    def vectors(self) -> torch.nn.Parameter:
        return self.embedding.new_vectors

    def prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            if prompt not in self._ids_cache:
                expanded = expand_trigger(prompt, self.settings.token, self.settings.vectors)
                self._ids_cache[prompt] = tokenize_prompts(self.bundle.tokenizer, [expanded], self.bundle.family.pad_with_eos)[0]
            rows.append(self._ids_cache[prompt])
        return torch.stack(rows)

    def loss(self, latents: torch.Tensor, prompts: list[str], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Denoising loss for a batch: add noise → predict it from the prompt → mean squared error."""
        scheduler = self.bundle.scheduler
        latents = latents * self.bundle.family.vae_scaling_factor  # the UNet works on scaled latents
        noisy = scheduler.add_noise(latents, noise, timesteps)  # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
        context = encode_prompt_ids(self.bundle.text_encoder, self.prompt_ids(prompts), self.settings.clip_skip, self.bundle.family.penultimate_layer)
        prediction = self.bundle.unet(noisy, timesteps, context).sample
        if self.bundle.family.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)  # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    def current_embedding(self, step: int) -> Embedding:
        return Embedding.from_tensors(
            self.settings.name, self.bundle.family, [self.vectors.detach()],
            step=step, checkpoint_hash=self.bundle.identity, checkpoint_name=self.bundle.display_name,
        )


def fixed_probe(examples: list[LatentExample], count: int, seed: int, num_timesteps: int):
    """A held-fixed set of (example index, noise, timestep) to measure loss comparably across steps."""
    generator = torch.Generator().manual_seed(seed)
    picks = [i % len(examples) for i in range(count)]
    noise = [torch.randn(examples[i].mean.shape, generator=generator) for i in picks]
    timesteps = torch.randint(0, num_timesteps, (count,), generator=generator)
    return picks, noise, timesteps


@torch.no_grad()
def probe_loss(model: TextualInversion, examples: list[LatentExample], probe, prompts: list[str]) -> float:
    picks, noise, timesteps = probe
    total = 0.0
    for index, i in enumerate(picks):
        total += model.loss(examples[i].mean[None], [prompts[i]], noise[index][None], timesteps[index : index + 1]).item()
    return total / len(picks)


def train_embedding(
    bundle: ModelBundle,
    examples: list[LatentExample],
    settings: TrainSettings,
    out_dir: Path,
    progress: Callable[[range], range] = lambda steps: steps,
) -> TrainResult:
    """Train one embedding and write {name}.safetensors/.pt, steps/ snapshots and loss.csv to `out_dir`."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = TextualInversion(bundle, settings)
    template = load_template(settings.template)
    schedule = parse_learning_rate(settings.learning_rate)
    optimizer = torch.optim.AdamW([model.vectors], lr=schedule[0].rate, weight_decay=0.0)
    num_timesteps = bundle.scheduler.config.num_train_timesteps
    once_latents = [sample_latent(e, "random", generator) for e in examples] if settings.latent_sampling == "once" else None

    probe = fixed_probe(examples, count=min(16, 2 * len(examples)), seed=settings.seed + 1, num_timesteps=num_timesteps)
    probe_prompts = [build_prompt(template[0] if template else None, e.caption, settings.token) for e in examples]
    probe_start = probe_loss(model, examples, probe, probe_prompts)

    order: list[int] = []
    log_rows = []
    started = time.perf_counter()
    for step in progress(range(settings.steps)):
        lr = learning_rate_at(schedule, step, settings.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(settings.grad_accum):
            batch = []
            for _ in range(settings.batch_size):
                if not order:  # a fresh shuffled pass over the data
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                batch.append(order.pop())
            latents = torch.stack([
                sample_latent(examples[i], settings.latent_sampling, generator, once_latents[i] if once_latents else None) for i in batch
            ])
            prompts = [build_prompt(rng.choice(template) if template else None, examples[i].caption, settings.token) for i in batch]
            noise = torch.randn(latents.shape, generator=generator)  # eps ~ N(0, I)
            timesteps = torch.randint(0, num_timesteps, (len(batch),), generator=generator)  # t ~ U{0..T-1}
            loss = model.loss(latents, prompts, noise, timesteps) / settings.grad_accum
            loss.backward()
            step_loss += loss.item()
        if not torch.isfinite(torch.tensor(step_loss)):
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: loss is %s; step skipped, vectors unchanged", step + 1, step_loss)
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        log_rows.append({"step": step + 1, "loss": step_loss, "lr": lr,
                         "images_per_s": (step + 1) * settings.batch_size * settings.grad_accum / elapsed})
        if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            save_embedding_files(model.current_embedding(step + 1), out_dir / "steps", f"{settings.name}-{step + 1}")
    final = model.current_embedding(settings.steps)
    save_embedding_files(final, out_dir, settings.name)
    write_csv_atomic(out_dir / "loss.csv", pd.DataFrame(log_rows, columns=["step", "loss", "lr", "images_per_s"]))
    return TrainResult(embedding=final, initial_vectors=model.initial, losses=[row["loss"] for row in log_rows],
                       probe_loss_start=probe_start, probe_loss_end=probe_loss(model, examples, probe, probe_prompts))

"""Validation loss per saved checkpoint: the training loss on noise and timesteps held fixed.

Training losses jump with each step's random noise and timestep, so they cannot rank checkpoints.
Here every checkpoint is scored on the same (image, noise, timestep) triples, with timesteps spread
evenly over the schedule, so the numbers differ only because the vectors differ. The prompts are
the first template line with each image's caption (no shuffling or dropout), as training builds them.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from stages.common.embedding import Embedding, EmbeddingError
from stages.common.embedding_read import read_embedding, read_embedding_for_model
from stages.common.models import ModelBundle
from stages.common.prompts import build_prompt, load_template
from stages.common.tokens import initial_vectors
from stages.train.dataset import LatentExample
from stages.train.trainer import TextualInversion, TrainSettings, pick_device, prepare_modules

log = logging.getLogger(__name__)

VAL_LOSS_COLUMNS = ["step", "val_loss", "vector_norm", "file"]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path | None  # None for the start, which training never saved
    label: str = ""  # what val_loss.csv's `file` column says; the path when empty

    @property
    def source(self) -> str:
        return self.label or str(self.path)

    @property
    def is_start(self) -> bool:
        return self.path is None


def starting_checkpoint(bundle: ModelBundle, init_text: str, init_from: str | None, vectors: int) -> tuple[Checkpoint, Embedding]:
    """The vectors training started from (init_from's, or init_text's words), to score as the baseline.

    Call before anything installs the run's token: init_text is looked up in the model's own vocabulary.
    """
    if init_from:
        embedding = read_embedding_for_model(init_from, bundle.family, (bundle.text_width,))
        return Checkpoint(embedding.step, None, f"start: init_from {init_from}"), embedding
    weight = bundle.text_encoder.get_input_embeddings().weight.detach()
    start = initial_vectors(bundle.tokenizer, weight, init_text, vectors)
    embedding = Embedding.from_tensors("start", bundle.family, [start], step=0)
    return Checkpoint(0, None, f"start: init_text {init_text!r}"), embedding


def find_checkpoints(train_dir: Path, run: str) -> list[Checkpoint]:
    """The run's step snapshots (steps/{run}-{step}.safetensors) and its final file, by step; the final wins a tie."""
    final = train_dir / f"{run}.safetensors"
    if not final.is_file():
        raise FileNotFoundError(f"{final} does not exist; run the train stage for {run!r} first")
    by_step: dict[int, Path] = {}
    pattern = re.compile(rf"^{re.escape(run)}-(\d+)\.safetensors$")
    for path in sorted((train_dir / "steps").glob("*.safetensors")):
        if match := pattern.match(path.name):
            by_step[int(match.group(1))] = path
    final_step = _read_step(final)
    by_step[final_step] = final
    return [Checkpoint(step, by_step[step]) for step in sorted(by_step)]


def _read_step(path: Path) -> int:
    return read_embedding(path).step


@dataclass(frozen=True)
class ValidationProbe:
    """The fixed (image, noise, timestep) triples every checkpoint is scored on."""

    picks: list[int]
    noise: list[torch.Tensor]
    timesteps: torch.Tensor

    @classmethod
    def build(cls, examples: list[LatentExample], samples: int, seed: int, num_timesteps: int) -> "ValidationProbe":
        generator = torch.Generator().manual_seed(seed)
        picks = [i % len(examples) for i in range(samples)]
        noise = [torch.randn(examples[i].mean.shape, generator=generator) for i in picks]
        # evenly spread timesteps, shuffled over images: less variance than random ones, every noise level counted
        spread = ((torch.arange(samples) + 0.5) * num_timesteps / samples).long().clamp(max=num_timesteps - 1)
        timesteps = spread[torch.randperm(samples, generator=generator)]
        return cls(picks, noise, timesteps)


class CheckpointModel:
    """The frozen model with the run's token installed; `use` swaps in one checkpoint's vectors.

    Prompts are encoded by tiflow's own encoder, as in training and its previews, so clip skip and
    the vectors act exactly as they did when the loss was measured.
    """

    def __init__(self, bundle: ModelBundle, first: Embedding, token: str, template: str, clip_skip: int = 1):
        settings = TrainSettings(name=first.name, token=token, vectors=first.vector_count, template=template, clip_skip=clip_skip)
        self.key = first.encoder_keys[0]
        self.model = TextualInversion(bundle, settings, start_vectors=first.vectors[self.key])
        self.device = pick_device()
        prepare_modules(bundle, settings, self.device)
        self.model.vectors.data = self.model.vectors.data.to(device=self.device, dtype=torch.float32)
        self.token, self.template = token, load_template(template)

    def use(self, embedding: Embedding, source: str) -> None:
        vectors = embedding.vectors[self.key]
        if vectors.shape != self.model.vectors.shape:
            raise EmbeddingError(f"{source}: {vectors.shape[0]} vectors, but the run's first checkpoint has "
                                 f"{self.model.vectors.shape[0]}; the run's folder mixes two trainings, rerun train")
        with torch.no_grad():
            self.model.vectors.copy_(vectors)

    @torch.no_grad()
    def context(self, prompts: list[str]) -> torch.Tensor:
        return self.model.context(prompts)

    def training_prompt(self, caption: str) -> str:
        return build_prompt(self.template[0] if self.template else None, caption, self.token)


def read_checkpoints(bundle: ModelBundle, checkpoints: list[Checkpoint]) -> dict[int, Embedding]:
    """Every checkpoint's embedding by step, each checked against the model's text width."""
    return {c.step: read_embedding_for_model(c.path, bundle.family, (bundle.text_width,)) for c in checkpoints if c.path}


def score_checkpoints(
    model: CheckpointModel,
    examples: list[LatentExample],
    scored: list[tuple[Checkpoint, Embedding]],
    num_timesteps: int,
    samples: int = 32,
    seed: int = 0,
    progress=None,
) -> pd.DataFrame:
    """val_loss.csv's table: one row per (checkpoint, embedding), in the order given, all on the same ValidationProbe."""
    prompts = [model.training_prompt(e.caption) for e in examples]
    probe = ValidationProbe.build(examples, samples, seed, num_timesteps)
    rows = []
    for checkpoint, embedding in (progress(scored) if progress else scored):
        model.use(embedding, checkpoint.source)
        rows.append({"step": checkpoint.step, "val_loss": _probe_loss(model.model, examples, prompts, probe, model.device),
                     "vector_norm": float(embedding.vectors[model.key].norm(dim=1).mean()), "file": checkpoint.source})
    return pd.DataFrame(rows, columns=VAL_LOSS_COLUMNS)


@torch.no_grad()
def _probe_loss(model: TextualInversion, examples: list[LatentExample], prompts: list[str], probe: ValidationProbe, device) -> float:
    total = 0.0
    for index, i in enumerate(probe.picks):
        latents = examples[i].mean[None].to(device)
        timestep = probe.timesteps[index : index + 1].to(device)
        total += model.loss(latents, [prompts[i]], probe.noise[index][None].to(device), timestep).item()
    return total / len(probe.picks)


def best_step(table: pd.DataFrame) -> int:
    """The saved checkpoint with the lowest validation loss; the earlier one on a tie (fewer steps, less overfit).

    The start row (file "start: ...") is a baseline, never the pick: it is not a trained embedding.
    """
    finite = table[table.val_loss.notna() & ~table.file.astype(str).str.startswith("start:")]
    if finite.empty:
        raise ValueError("no checkpoint has a finite validation loss; check the train stage's log for NaN steps")
    return int(finite.sort_values(["val_loss", "step"]).iloc[0].step)

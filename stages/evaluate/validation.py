"""Validation loss per saved checkpoint: the training loss on noise and timesteps held fixed.

Training losses jump with each step's random noise and timestep, so they cannot rank checkpoints.
Here every checkpoint is scored on the trainer's own fixed probe (same images, noise and evenly
spread timesteps) and its prompts, so the numbers differ only because the vectors differ.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from stages.common.embedding.core import Embedding, EmbeddingError
from stages.common.embedding.read import read_embedding_for_model
from stages.common.errors import InputError, MissingInput
from stages.common.latents import LatentExample
from stages.common.models import ModelBundle
from stages.common.prompts import load_template
from stages.common import textual_inversion as core  # the loss, probe and start training used
from stages.common.trigger import NEGATIVE_SUFFIX

log = logging.getLogger(__name__)

VAL_LOSS_COLUMNS = ["step", "val_loss", "vector_norm", "start", "file"]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    source: str  # the file, or for the start what it was made from; val_loss.csv's `file` column
    is_start: bool = False  # the vectors training began from: a baseline, never a saved embedding
    negative: Embedding | None = None  # APT: the {run}-neg embedding saved at the same step


def starting_checkpoint(bundle: ModelBundle, run: str, init_text: str, init_from: str | None, vectors: int,
                        apt: core.AptSettings | None = None, seed: int = 0) -> tuple[Checkpoint, Embedding]:
    """The vectors training started from (train's own starting point, APT's negative one too), to score as the baseline.

    Call before anything installs the run's token: init_text is looked up in the model's own vocabulary.
    """
    start, step = core.starting_point(bundle, init_text, init_from, vectors)
    source = f"init_from {init_from}" if init_from else f"init_text {init_text!r}"
    negative = Embedding(run + NEGATIVE_SUFFIX, core.negative_starting_point(bundle, apt, seed), step=step) if apt else None
    return Checkpoint(step, source, is_start=True, negative=negative), Embedding(run, start, step=step)


def load_checkpoints(bundle: ModelBundle, train_dir: Path, run: str, paired: bool = False) -> list[tuple[Checkpoint, Embedding]]:
    """The run's step snapshots (steps/{run}-{step}.safetensors) and its final file, by step, each read once
    and checked against the model; the final file wins a tie. `paired` (APT): each comes with its -neg file."""
    final = train_dir / f"{run}.safetensors"
    if not final.is_file():
        raise MissingInput(f"{final} does not exist; run the train stage for {run!r} first")
    pattern = re.compile(rf"^{re.escape(run)}-(\d+)\.safetensors$")
    snapshots = {int(m.group(1)): path for path in (train_dir / "steps").glob("*.safetensors") if (m := pattern.match(path.name))}
    final_checkpoint, final_embedding = _load_one(bundle, final, None, paired)
    snapshots.pop(final_embedding.step, None)
    loaded = {step: _load_one(bundle, path, step, paired) for step, path in snapshots.items()}
    loaded[final_embedding.step] = final_checkpoint, final_embedding
    return [loaded[step] for step in sorted(loaded)]


def _load_one(bundle: ModelBundle, path: Path, step: int | None, paired: bool) -> tuple[Checkpoint, Embedding]:
    embedding = _read_checked(bundle, path)
    negative = None
    if paired:  # DreamArtist's names: {run}-neg beside {run}, {run}-{step}-neg beside {run}-{step}
        negative_path = path.with_name(f"{path.stem}{NEGATIVE_SUFFIX}{path.suffix}")
        if not negative_path.is_file():
            raise MissingInput(f"{negative_path} does not exist, but {path.name} comes from an APT run (train.apt); rerun train")
        negative = _read_checked(bundle, negative_path)
    return Checkpoint(embedding.step if step is None else step, str(path), negative=negative), embedding


def _read_checked(bundle: ModelBundle, path: Path) -> Embedding:
    return read_embedding_for_model(path, bundle.family, bundle.text_widths)


class CheckpointModel:
    """The frozen model with the run's token installed; `use` swaps in one checkpoint's vectors.

    Prompts are encoded by tiflow's own encoder, as in training and its previews, so clip skip and
    the vectors act exactly as they did when the loss was measured.
    """

    def __init__(self, bundle: ModelBundle, first: Embedding, token: str, template: str, clip_skip: int,
                 apt: core.AptSettings | None = None, first_negative: Embedding | None = None):
        self.model = core.TextualInversion(bundle, token, first.vectors, clip_skip, apt, first_negative.vectors if first_negative else None)
        core.prepare_modules(bundle, core.ComputeOptions.plain("auto"), core.pick_device())
        for vectors in self.model.parameters:
            vectors.data = vectors.data.to(device=core.pick_device(), dtype=torch.float32)
        self.token, self.template = token, load_template(template)

    def use(self, embedding: Embedding, source: str, negative: Embedding | None = None) -> None:
        """Swap in one checkpoint's vectors (and, for an APT run, its negative embedding's)."""
        for name, given in ((self.model.token, embedding), (self.model.negative_token, negative)):
            if name is None:
                continue
            if given is None:
                raise EmbeddingError(f"{source}: no {name} embedding to go with it; the run trained with APT, rerun train")
            if given.vector_count != self.model.counts[name]:
                raise EmbeddingError(f"{source}: {given.vector_count} {name} vectors, but the run's first checkpoint has "
                                     f"{self.model.counts[name]}; the run's folder mixes two trainings, rerun train")
            self.model.load_vectors(given.vectors, source, name)

    @torch.no_grad()
    def conditioning(self, prompts: list[str]) -> core.PromptConditioning:
        return self.model.conditioning(prompts)


def score_checkpoints(
    model: CheckpointModel,
    examples: list[LatentExample],
    scored: list[tuple[Checkpoint, Embedding]],
    num_timesteps: int,
    samples: int,
    seed: int,
    progress=None,
) -> pd.DataFrame:
    """val_loss.csv's table: one row per (checkpoint, embedding), in the order given, all on the same fixed probe."""
    prompts = core.probe_prompts(model.template, examples, model.token)
    probe = core.fixed_probe(examples, samples, seed, num_timesteps)
    rows = []
    for checkpoint, embedding in (progress(scored) if progress else scored):
        model.use(embedding, checkpoint.source, checkpoint.negative)
        rows.append({"step": checkpoint.step, "val_loss": core.probe_loss(model.model, examples, probe, prompts),
                     "vector_norm": vector_norm(embedding),
                     "start": checkpoint.is_start, "file": checkpoint.source})
    return pd.DataFrame(rows, columns=VAL_LOSS_COLUMNS)


def vector_norm(embedding: Embedding) -> float:
    """The mean vector length, over every text encoder's vectors (SDXL: clip_l and clip_g)."""
    return float(torch.cat([vectors.norm(dim=1) for vectors in embedding.vectors.values()]).mean())


def best_step(table: pd.DataFrame) -> int:
    """The saved checkpoint with the lowest validation loss; the earlier one on a tie (fewer steps, less overfit).

    The start row is a baseline, never the pick: it is not a trained embedding.
    """
    finite = table[table.val_loss.notna() & ~table.start.astype(bool)]
    if finite.empty:
        raise InputError("no checkpoint has a finite validation loss; check the train stage's log for NaN steps")
    return int(finite.sort_values(["val_loss", "step"]).iloc[0].step)

"""The evaluate stage's work for one run: grids, validation loss per checkpoint, the best checkpoint, a report.

Writes into the run's evaluate folder:
  grid.png         prompts × seeds with the final embedding
  checkpoints.png  the first prompt × seeds for the start and a few checkpoints side by side (the best one marked)
  val_loss.csv     step, val_loss, vector_norm, file: the start and every saved checkpoint on the same fixed noise
  loss.png         the training loss curve with the validation losses on it
  best/{run}.safetensors, best/{run}.pt   the checkpoint with the lowest validation loss, named as the run
  metrics.json     the numbers above in one place
  index.html       all of it on one page
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from stages.common.embedding.core import Embedding, save_embedding_files
from stages.common.errors import InputError
from stages.common.layout import latest_snapshot
from stages.common.files import atomic_path, write_csv_atomic, write_text_atomic
from stages.common.pages import preflight_page_link
from stages.common.models import ModelBundle
from stages.common.sampling import build_pipeline, sample_image
from stages.common.charts import step_chart
from stages.common.tokens import without_trigger
from stages.evaluate.grid import compose_grid, grid_steps, render_samples, seed_labels, spread_steps
from stages.evaluate.html import write_report
from stages.evaluate.image_loss import IMAGE_LOSS_COLUMNS, image_losses, outlier_hints, rank_images, thumbnails
from stages.evaluate.validation import (
    CheckpointModel,
    best_step,
    load_checkpoints,
    score_checkpoints,
    starting_checkpoint,
)
from stages.common.latents import load_examples, split_validation
from stages.common.textual_inversion import AptSettings, pick_device, probe_prompts
from stages.common.trigger import NEGATIVE_SUFFIX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunToEvaluate:
    """One trained run and the data it was trained on."""

    name: str
    token: str  # the trigger word in prompts
    template: str  # train.template, so validation prompts are built as training built them
    train_dir: Path
    latents_dir: Path
    captions_dir: Path
    validation_split: float  # train.validation_split: score on the images training held out
    init_text: str  # where training started, scored as the baseline row
    init_from: str | None
    apt: AptSettings | None = None  # DreamArtist's APT: the run also trained {run}-neg
    seed: int = 0  # train.seed: APT's negative start is drawn from it
    images_dir: Path | None = None  # the preprocess folder: thumbnails and crops for the per-image ranking

    @classmethod
    def from_run_settings(cls, name: str, settings: dict, train_dir: Path, latents_dir: Path, captions_dir: Path,
                          images_dir: Path | None = None) -> "RunToEvaluate":
        """From the run's merged, schema-checked settings (config.run_settings)."""
        return cls(name, settings["token"], settings["template"], train_dir, latents_dir, captions_dir,
                   settings["validation_split"], settings["init_text"], settings.get("init_from"),
                   AptSettings.from_section(settings.get("apt")), settings["seed"], images_dir)


def plot_loss(loss_csv: Path, validation: pd.DataFrame | None, target: Path) -> None:
    """Training loss per step with a moving average, and the validation loss of each checkpoint."""
    with step_chart(target, "loss") as axis:
        if loss_csv.is_file():
            table = pd.read_csv(loss_csv)
            axis.plot(table.step, table.loss, alpha=0.3, label="training loss")
            window = len(table) // 20
            if window > 1:
                axis.plot(table.step, table.loss.rolling(window, min_periods=1).mean(), label=f"training loss, mean of {window}")
        if validation is not None and not validation.empty:
            axis.plot(validation.step, validation.val_loss, "o-", color="black", label="validation loss (fixed noise)")


def save_png(image, target: Path) -> None:
    with atomic_path(target) as temp:
        image.save(temp, format="PNG")


def baseline_prompt(prompt: str, run: RunToEvaluate) -> str:
    """The prompt without the embedding: its trigger replaced by the init text (a word to start from), or removed."""
    words = "" if run.init_from or run.init_text.strip() in ("", "*") else run.init_text.strip()
    return without_trigger(prompt, run.token, words)


def baseline_grid(pipeline, model: CheckpointModel, run: RunToEvaluate, prompts: list[str], seeds: list[int], render: tuple,
                  checkpoints: list[tuple[int, Embedding, Embedding | None]]):
    """Prompt × seed rows; the first column renders the prompt without the embedding, the others at each checkpoint.

    The same seed gives the same starting noise in every cell of a row, so only the embedding differs, as
    in AUTOMATIC1111's X/Y plot with the trigger word swapped out by hand. Returns the grid and its cells
    (column, step, prompt without the trigger, seed, image), which the similarity scores read.
    """
    plain_prompts = [baseline_prompt(p, run) for p in prompts]
    plain, no_negative = [model.conditioning([p]) for p in plain_prompts], model.conditioning([""])
    cells = {(p, seed, "base"): sample_image(pipeline, seed, render[0], render[1], render[2], plain[p], no_negative)
             for p in range(len(prompts)) for seed in seeds}
    negative_text = [model.model.negative_token or ""]
    for step, embedding, negative in checkpoints:
        model.use(embedding, f"step {step}", negative)
        negative_now = model.conditioning(negative_text)
        for p, prompt in enumerate(prompts):
            conditioning = model.conditioning([prompt])
            for seed in seeds:
                cells[(p, seed, step)] = sample_image(pipeline, seed, render[0], render[1], render[2], conditioning, negative_now)
    rows = [[cells[(p, seed, "base")]] + [cells[(p, seed, step)] for step, _, _ in checkpoints] for p in range(len(prompts)) for seed in seeds]
    labels = [f"{prompt}  /  seed {seed}" for prompt in prompts for seed in seeds]
    columns = [BASELINE_COLUMN] + [f"step {step}" for step, _, _ in checkpoints]
    listed = [{"column": BASELINE_COLUMN if step == "base" else f"step {step}", "step": None if step == "base" else step,
               "prompt": plain_prompts[p], "seed": seed, "image": image} for (p, seed, step), image in cells.items()]
    return compose_grid(rows, labels, columns), listed


BASELINE_COLUMN = "without the embedding"


def score_similarity(clip_model: str | None, cells: list[dict], images_dir: Path | None, image_names: list[str],
                     out_dir: Path) -> pd.DataFrame | None:
    """similarity.csv (per grid image) and similarity.png (per checkpoint) when evaluate.clip_model is set; else None."""
    for stale in ("similarity.csv", "similarity.png"):
        (out_dir / stale).unlink(missing_ok=True)
    if not clip_model or not cells or images_dir is None:
        return None
    from stages.evaluate.similarity import ClipScorer, plot_tradeoff, similarity_table, summarise

    scorer = ClipScorer.load(clip_model, pick_device())
    training = []
    for name in image_names:
        try:
            with Image.open(images_dir / name) as picture:
                training.append(picture.convert("RGB"))
        except (OSError, ValueError) as error:
            raise InputError(f"{images_dir / name}: cannot read this training image for the likeness scores ({error}); "
                             "rerun preprocess, or set evaluate.clip_model: null") from None
    table = similarity_table(scorer, cells, training)
    write_csv_atomic(out_dir / "similarity.csv", table)
    summary = summarise(table)
    plot_tradeoff(summary, out_dir / "similarity.png")
    return summary


def rank_training_images(model: CheckpointModel, run: RunToEvaluate, examples: list, held_out: list, section: dict,
                         out_dir: Path, progress=None) -> tuple[pd.DataFrame, dict[str, str]]:
    """image_loss.csv (the current checkpoint's loss per image, worst first) and a thumbnail per image for the page."""
    prompts = probe_prompts(model.template, examples, run.token)
    table = image_losses(model.model, examples, prompts, {e.image for e in held_out}, section["image_loss_timesteps"],
                         section["validation_seed"], progress)
    manifest_path = run.images_dir / "manifest.csv" if run.images_dir else None
    manifest = pd.read_csv(manifest_path, keep_default_na=False) if manifest_path and manifest_path.is_file() else None
    ranked = rank_images(table, outlier_hints(manifest, dict(zip(table.image, table.caption)), run.init_text.split()))
    write_csv_atomic(out_dir / "image_loss.csv", ranked)
    return ranked, thumbnails(ranked, run.images_dir, out_dir / "thumbs") if run.images_dir else {}


def evaluate_run(bundle: ModelBundle, run: RunToEvaluate, section: dict, size: tuple[int, int], out_dir: Path,
                 clip_skip: int = 1, progress=None) -> dict:
    """Write every evaluate output for `run` into out_dir; return the metrics (also in metrics.json)."""
    saved = load_checkpoints(bundle, run.train_dir, run.name, paired=run.apt is not None)
    embeddings = {checkpoint.step: embedding for checkpoint, embedding in saved}
    first, final = saved[0][1], saved[-1][0]
    # before the token exists
    start, start_embedding = starting_checkpoint(bundle, run.name, run.init_text, run.init_from, first.vector_count, run.apt, run.seed)
    trained_on, held_out = split_validation(load_examples(run.latents_dir, run.captions_dir), run.validation_split)
    examples = held_out or trained_on  # the same split training made; without one, the training images
    model = CheckpointModel(bundle, first, run.token, run.template, clip_skip, run.apt, saved[0][0].negative)
    negatives = {checkpoint.step: checkpoint.negative for checkpoint, _ in saved}
    out_dir.mkdir(parents=True, exist_ok=True)

    validation = score_checkpoints(model, examples, [(start, start_embedding)] + saved, bundle.scheduler.config.num_train_timesteps,
                                   section["validation_samples"], section["validation_seed"], progress)
    write_csv_atomic(out_dir / "val_loss.csv", validation)
    best = best_step(validation)
    best_pair = [(run.name, embeddings[best])] + ([(run.name + NEGATIVE_SUFFIX, negatives[best])] if negatives[best] else [])
    best_files = [path for stem, embedding in best_pair for path in save_embedding_files(embedding, out_dir / "best", stem)]
    plot_loss(run.train_dir / "loss.csv", validation, out_dir / "loss.png")
    ranking, thumbs = None, {}
    if section["image_loss_timesteps"]:
        model.use(embeddings[best], f"step {best}", negatives[best])
        ranking, thumbs = rank_training_images(model, run, trained_on + held_out, held_out, section, out_dir)
    else:  # a declared output: its header says what it would hold
        write_csv_atomic(out_dir / "image_loss.csv", pd.DataFrame(columns=IMAGE_LOSS_COLUMNS))

    pipeline = build_pipeline(bundle)
    prompts = [p.replace("[name]", run.token) for p in section["prompts"]]
    seeds, render = section["seeds"], (size, section["steps"], section["guidance_scale"])
    negative_prompt = [model.model.negative_token or ""]  # APT: {run}-neg is the negative prompt, as DreamArtist uses it
    model.use(embeddings[final.step], final.source, negatives[final.step])
    rows = render_samples(pipeline, [model.conditioning([p]) for p in prompts], model.conditioning(negative_prompt), seeds, *render)
    save_png(compose_grid(rows, prompts, seeds_shown := seed_labels(seeds)), out_dir / "grid.png")
    baseline_steps = grid_steps(sorted(embeddings), section["grid_steps"], section["checkpoint_grid"], best)
    cells = []
    if baseline_steps:
        grid, cells = baseline_grid(pipeline, model, run, prompts, seeds, render, [(step, embeddings[step], negatives[step]) for step in baseline_steps])
        save_png(grid, out_dir / "baseline.png")
    else:
        (out_dir / "baseline.png").unlink(missing_ok=True)
    similarity = score_similarity(section["clip_model"], cells, run.images_dir, sorted({e.image for e in trained_on}), out_dir)

    shown = spread_steps(sorted(embeddings), section["checkpoint_grid"], best)
    rows, labels = [], []
    for label, embedding, negative in ([("start", start_embedding, start.negative)] if shown else []) + [
            (f"step {step}{' (best)' if step == best else ''}", embeddings[step], negatives[step]) for step in shown]:  # short: cells can be 64 px
        model.use(embedding, label, negative)
        rows += render_samples(pipeline, [model.conditioning(prompts[:1])], model.conditioning(negative_prompt), seeds, *render)
        labels.append(label)
    if rows:
        save_png(compose_grid(rows, labels, seeds_shown), out_dir / "checkpoints.png")
    else:
        (out_dir / "checkpoints.png").unlink(missing_ok=True)

    metrics = _metrics(run, validation, best, final.step, examples, bool(held_out), section, best_files, out_dir)
    if ranking is not None:  # worst first
        metrics["worst_image"] = str(ranking.image.iloc[0])
        metrics["image_outliers"] = ranking[ranking.outlier].image.tolist()
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_report(out_dir / "index.html", metrics, validation, has_checkpoint_grid=bool(rows), has_baseline_grid=bool(baseline_steps),
                 image_ranking=ranking, thumbs=thumbs, similarity=similarity, clip_model=section["clip_model"],
                 preflight_page=preflight_page_link(out_dir.parent, out_dir))
    return metrics


def _metrics(run: RunToEvaluate, validation: pd.DataFrame, best: int, final_step: int, examples: list, held_out: bool,
             section: dict, best_files: list[Path], out_dir: Path) -> dict:
    is_start = validation.start.astype(bool)
    start_loss = float(validation[is_start].val_loss.iloc[0])
    trained = validation[~is_start]
    loss_of = dict(zip(trained.step, trained.val_loss))
    return {
        "run": run.name,
        "token": run.token,
        "validation_images": len({e.image for e in examples}),
        "validation_latents": len(examples),  # images times flips
        "validation_set": "held out" if held_out else "training images",
        "checkpoints": len(trained),
        "final_step": final_step,
        "best_step": best,
        "start": str(validation[is_start].file.iloc[0]),
        "val_loss_start": _number(start_loss),
        "val_loss_best": _number(loss_of[best]),
        "val_loss_final": _number(loss_of[final_step]),
        "val_loss_best_vs_start": _number(loss_of[best] / start_loss - 1) if start_loss else None,
        "beats_start": bool(loss_of[best] < start_loss),
        "vector_norm_final": _number(trained.vector_norm.iloc[-1]),
        "train_loss_last_10pct_mean": _recent_training_loss(run.train_dir / "loss.csv"),
        "validation_samples": section["validation_samples"],
        "best_files": [str(p.relative_to(out_dir)) for p in best_files],
        "earlier_trainings": earlier_trainings(run.train_dir, run.name),
    }


def earlier_trainings(train_dir: Path, run: str) -> list[dict]:
    """Trainings of this run that a retrain set aside (steps/earlier-*), each with its last checkpoint: not scored, but kept."""
    found = []
    for folder in sorted((train_dir / "steps").glob("earlier-*")):
        last = latest_snapshot(folder, run)
        found.append({"folder": str(folder), "last_checkpoint": str(last) if last else None})
    return found


def _recent_training_loss(loss_csv: Path) -> float | None:
    if not loss_csv.is_file():
        return None
    losses = pd.read_csv(loss_csv).loss.dropna()
    return _number(losses.tail(max(1, len(losses) // 10)).mean()) if len(losses) else None


def _number(value) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None

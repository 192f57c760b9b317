"""The pre-flight report: what training is about to get, what it will cost, and settings known to fail.

Written before any run trains (out/preflight/preflight.json and index.html), from what preprocess and
caption wrote and from a few real steps timed on the device training will use:
  - images kept and skipped, duplicates;
  - the source images' aspect ratios and how the buckets fill (partial batches);
  - each run's prompt token budget: prompts over the window, prompts without the trigger, and what
    its vectors leave of the 75 tokens;
  - each run's measured time per step and peak memory, and the time its steps will take;
  - warnings: a learning rate far from the usual range for its vector count, batch_size above the
    smallest bucket, fp16 on SDXL's VAE.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path
from typing import Callable

import pandas as pd

from stages.common.config import run_settings
from stages.common.files import write_text_atomic
from stages.common.layout import PIXELS_PER_LATENT, StageDirs
from stages.common.tokens import PROMPT_TOKEN_BUDGET
from stages.train.optim import LearningRate
from stages.train.order import BatchOrder
from stages.train.settings import TrainSettings

log = logging.getLogger(__name__)

# AUTOMATIC1111's default is 0.005 and its users' guides go to 0.01 for speed, 0.1 only briefly at the start
# of a schedule; more vectors learn (and overfit) faster, so the top of the range falls as vectors grow.
USUAL_RATE_LOW, USUAL_RATE_HIGH, HIGHEST_RATE = 1e-4, 0.05, 0.2


def usual_rate_range(vectors: int) -> tuple[float, float]:
    return USUAL_RATE_LOW, USUAL_RATE_HIGH / max(1.0, vectors / 4)


def learning_rate_warning(learning_rate: float | str, vectors: int, steps: int, key: str) -> str | None:
    """A warning when the rate most steps train at is far outside the usual range for `vectors`, or any step's is extreme."""
    schedule = LearningRate(learning_rate, "constant", 0, steps)
    rates = [schedule.at(step) for step in range(0, schedule.steps_to_take, max(1, schedule.steps_to_take // 200))]
    typical, highest = statistics.median(rates), max(rates)
    low, high = usual_rate_range(vectors)
    usual = f"the usual range for {vectors} vector{'s' if vectors != 1 else ''} is {low:g} to {high:g}; AUTOMATIC1111's default is 0.005"
    if typical > high:
        return (f"{key}: most steps train at {typical:g}, far above what works ({usual}): the vectors overshoot and the embedding "
                f"comes out as noise or NaN; lower it, or end a schedule lower (e.g. '0.05:100, 0.005')")
    if highest > HIGHEST_RATE:
        return f"{key}: some steps train at {highest:g}, above {HIGHEST_RATE:g}, which breaks embeddings in a few steps ({usual})"
    if typical < low:
        return f"{key}: most steps train at {typical:g}, far below what works ({usual}): the embedding will barely move from its start"
    return None


def latent_sizes(preprocess_dir: Path, flip: bool) -> list[tuple[int, int]]:
    """(height, width) of every latent training will see: one per image, two with mirrored copies."""
    manifest = pd.read_csv(preprocess_dir / "manifest.csv", keep_default_na=False)
    sizes = [(int(r.out_height) // PIXELS_PER_LATENT, int(r.out_width) // PIXELS_PER_LATENT) for r in manifest.itertuples()]
    return sizes * 2 if flip else sizes


def bucket_fill(sizes: list[tuple[int, int]], batch_size: int, repeats: int) -> list[dict]:
    """Per latent size: images per pass, full batches and the partial batch left over (BatchOrder's own cut)."""
    order = BatchOrder(sizes, batch_size, repeats, seed=0)
    rows = []
    for (height, width), indices in order.buckets().items():
        count = len(indices) * repeats
        rows.append({"width": width * PIXELS_PER_LATENT, "height": height * PIXELS_PER_LATENT, "latents": count,
                     "full_batches": count // batch_size, "partial_batch": count % batch_size})
    return rows


def token_budget(prompts) -> dict:
    """From `tiflow prompts`' rows (stages/tools/prompt_report.py): what the run's prompts leave of the token window."""
    rows = prompts.rows
    longest = max((row.token_count for row in rows), default=0)
    return {
        "prompts": len(rows),
        "longest_prompt_tokens": longest,
        "tokens_left": PROMPT_TOKEN_BUDGET - longest,
        "over_budget": [{"image": row.image, "tokens": row.token_count, "prompt": row.prompt}
                        for row in rows if row.token_count > PROMPT_TOKEN_BUDGET],
        "missing_trigger": [{"image": row.image, "prompt": row.prompt}
                            for row in rows if any("never contains the trigger" in w for w in row.warnings)],
    }


def settings_warnings(run: str, settings: dict, config: dict, buckets: list[dict], family_name: str, device: str) -> list[str]:
    """Settings known to fail, each naming the key to change."""
    key = lambda name: f"runs.{run}.{name}" if name in (config["runs"][run] or {}) else f"train.{name}"  # noqa: E731
    warnings = []
    rate = learning_rate_warning(settings["learning_rate"], settings["vectors"], settings["steps"], key("learning_rate"))
    if rate:
        warnings.append(rate)
    smallest = min(buckets, key=lambda b: b["latents"], default=None)
    if smallest and settings["batch_size"] > smallest["latents"]:
        warnings.append(f"{key('batch_size')}: {settings['batch_size']} is larger than the smallest bucket ({smallest['width']}x{smallest['height']}, "
                        f"{smallest['latents']} latents a pass): its batches hold only {smallest['latents']}, so steps differ in size; "
                        "lower batch_size, raise repeats, or add images of that shape")
    vae_precision = config["cache_latents"]["dtype"]
    if family_name == "sdxl" and (vae_precision == "fp16" or (vae_precision == "auto" and device == "cuda")):
        warnings.append(f"cache_latents.dtype: {vae_precision} runs SDXL's VAE in fp16, which overflows (NaN latents, black images); "
                        "tiflow encodes those again in fp32, at twice the cost. Set cache_latents.dtype: bf16 or fp32, or use a "
                        "VAE fixed for fp16 (madebyollin/sdxl-vae-fp16-fix)")
    return warnings


def timing_key(settings: TrainSettings) -> tuple:
    """The settings a step's time and memory depend on: runs that share them are timed once."""
    apt = settings.apt
    return (settings.precision, settings.gradient_checkpointing, settings.channels_last, settings.compile, settings.batch_size,
            settings.grad_accum, settings.vectors, (apt.vectors_neg, apt.reconstruction) if apt else None)


def _timing_cache_key(config: dict, train: TrainSettings, latent_size: tuple[int, int], device: str) -> str:
    """Runs with the same model (file and date), step settings, largest bucket and device cost the same: time them once."""
    path = Path(config["model"]["path"])
    stamp = [path.stat().st_size, path.stat().st_mtime_ns] if path.exists() else None
    return hashlib.sha256(json.dumps([config["model"], stamp, timing_key(train), list(latent_size), device]).encode()).hexdigest()[:24]


def run_preflight(config: dict, run: str, load_model: Callable, measure: Callable, cache_dir: Path | None = None) -> dict:
    """One run's part of the report: measured step time and memory, its buckets, token budget and warnings.

    `load_model()` gives a fresh model bundle; `measure(bundle, settings, latent_size)` times steps. A run whose
    step costs what an earlier one's did (same model, settings and largest bucket) reuses that timing from `cache_dir`.
    """
    from stages.common.textual_inversion import pick_device
    from stages.tools.prompt_report import build_run_prompts

    dirs = StageDirs(config["out_dir"])
    captions = pd.read_csv(dirs.caption / "captions.csv", keep_default_na=False, dtype=str)
    sizes = latent_sizes(dirs.preprocess, config["preprocess"]["flip"])
    largest = max(sizes, key=lambda hw: hw[0] * hw[1])
    settings = run_settings(config, run)
    train = TrainSettings.from_section(settings, run, config["model"]["clip_skip"])
    cached = cache_dir / f"{_timing_cache_key(config, train, largest, pick_device().type)}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        timing = json.loads(cached.read_text(encoding="utf-8"))
    else:
        bundle = load_model()
        measured = measure(bundle, train, largest)
        height, width = measured.latent_size
        timing = {"device": measured.device, "family": bundle.family.name, "latent_size": [height, width],
                  "bucket": f"{width * PIXELS_PER_LATENT}x{height * PIXELS_PER_LATENT}",
                  "batch_size": train.batch_size, "grad_accum": train.grad_accum, "vectors": train.vectors, "apt": train.apt is not None,
                  "precision": f"{train.precision} ({measured.dtype})",
                  "gradient_checkpointing": train.gradient_checkpointing, "step_seconds": measured.step_seconds,
                  "seconds_per_step": measured.seconds_per_step, "peak_memory_bytes": measured.peak_memory_bytes,
                  "memory_kind": measured.memory_kind}
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached, json.dumps(timing))
    buckets = bucket_fill(sizes, train.batch_size, train.repeats)
    return {
        "token": train.token, "vectors": train.vectors, "steps": train.steps, "batch_size": train.batch_size,
        "learning_rate": train.learning_rate, "timing": timing,
        "estimated_training_seconds": round(timing["seconds_per_step"] * train.steps, 1),
        "buckets": buckets,
        "tokens": token_budget(build_run_prompts(config, run, captions)),
        "warnings": settings_warnings(run, settings, config, buckets, timing["family"], timing["device"]),
    }


def build_preflight(config: dict, load_model: Callable, measure: Callable, progress=None, cache_dir: Path | None = None) -> dict:
    """The whole report in one go: every run's part, then assembled (tests, and `python -m stages.train --preflight` by hand)."""
    from stages.train.preflight_page import assemble_preflight

    runs = list(config["runs"])
    return assemble_preflight(config, {run: run_preflight(config, run, load_model, measure, cache_dir)
                                       for run in (progress(runs) if progress else runs)})

"""What the Snakefile needs from the config: each rule's settings as JSON and its input files."""
from __future__ import annotations

import json
from pathlib import Path

from stages.common.config import run_settings
from stages.common.paths import BUILTIN_PREFIX, DEMO_DATASET
from stages.common.errors import MissingInput


def to_json(value) -> str:
    """Stable JSON, so an unchanged section gives unchanged params and Snakemake reruns nothing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def dataset_inputs(config: dict) -> list[str]:
    """Every file of the image folder, so adding, removing or editing one reruns preprocess."""
    images = config["dataset"]["images"]
    if images == DEMO_DATASET:
        return []
    folder = Path(images)
    if not folder.is_dir():
        raise MissingInput(f"dataset.images: {images} is not a folder; give a folder of images or {DEMO_DATASET}")
    entries = folder.rglob("*") if config["preprocess"].get("recursive") else folder.iterdir()
    return sorted(str(p) for p in entries if p.is_file())


def model_inputs(config: dict) -> list[str]:
    """The model file or folder, so replacing the checkpoint reruns what depends on it."""
    path = config["model"]["path"]
    if path.startswith(BUILTIN_PREFIX):
        return []
    if not Path(path).exists():
        raise MissingInput(f"model.path: {path} does not exist; give a diffusers folder, a .safetensors/.ckpt file or builtin:tiny-sd15")
    return [path]


def train_inputs(config: dict, run: str) -> list[str]:
    """The embedding a run starts from (init_from), so replacing that file retrains the run."""
    start = run_settings(config, run).get("init_from")
    return [start] if start else []


def train_params(config: dict, run: str) -> str:
    run_section = {k: v for k, v in run_settings(config, run).items() if k != "name"}
    return to_json({"model": config["model"], "run": run_section, "size": config["preprocess"]["size"]})


EVALUATE_RUN_KEYS = ("token", "template", "validation_split", "init_text", "init_from")  # the run settings evaluate reads


def evaluate_params(config: dict, run: str) -> str:
    # only the run keys evaluate uses (prompts, held-out images, starting vectors): other train edits don't rerun it
    run_section = {k: v for k, v in run_settings(config, run).items() if k in EVALUATE_RUN_KEYS}
    return to_json({"model": config["model"], "evaluate": config["evaluate"], "size": config["preprocess"]["size"], "run": run_section})

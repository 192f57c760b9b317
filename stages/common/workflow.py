"""What the Snakefile needs from the config: each rule's settings as JSON and its input files."""
from __future__ import annotations

import json
from pathlib import Path

from stages.common.config import ConfigError, run_settings
from stages.common.errors import MissingInput
from stages.common.files import write_text_atomic
from stages.common.paths import BUILTIN_PREFIX, DEMO_DATASET

# The config sections each stage reads (stage_cli.read_settings checks --settings against these).
STAGE_SECTIONS = {
    "preprocess": ("out_dir", "dataset", "preprocess"),
    "caption": ("out_dir", "caption"),
    "cache_latents": ("out_dir", "model", "cache_latents", "preprocess"),
    "train": ("out_dir", "model", "train", "runs", "preprocess"),
    "preflight": ("out_dir", "model", "train", "runs", "preprocess", "cache_latents"),
    "evaluate": ("out_dir", "model", "evaluate", "runs", "preprocess"),
    "overview": ("out_dir", "runs", "sweeps"),
}


def to_json(value) -> str:
    """Stable JSON, so an unchanged section gives unchanged params and Snakemake reruns nothing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


DATASET_LISTING = Path(".snakemake/tiflow/dataset-listing.tsv")  # relative to the workflow's folder


def dataset_inputs(config: dict, listing: Path = DATASET_LISTING) -> list[str]:
    """preprocess's input for the image folder: one listing file (name, size, mtime of every file) that is
    rewritten only when the folder changes, so adding, removing or editing an image reruns preprocess.

    Declaring each image as an input costs Snakemake about a second per 10,000 files on every start,
    a no-op rerun included; one file that changes exactly when the folder does costs nothing.
    """
    images = config["dataset"]["images"]
    if images == DEMO_DATASET:
        return []
    folder = Path(images)
    if not folder.is_dir():
        raise MissingInput(f"dataset.images: {images} is not a folder; give a folder of images or {DEMO_DATASET}")
    entries = folder.rglob("*") if config["preprocess"].get("recursive") else folder.iterdir()
    lines = []
    for path in sorted(entries):
        try:
            stat = path.stat()
        except OSError:
            continue  # vanished while listing: the next start sees the folder as it is
        if path.is_file():
            lines.append(f"{path.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    text = f"# the files of {folder.resolve()}: name, size, mtime (tiflow rewrites this when they change)\n" + "\n".join(lines) + "\n"
    try:
        unchanged = listing.read_text(encoding="utf-8") == text
    except OSError:
        unchanged = False
    if not unchanged:
        listing.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(listing, text)
    return [str(listing)]


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


# the run settings evaluate reads: prompts, held-out images, starting vectors; APT's settings and the seed its negative start comes from
EVALUATE_RUN_KEYS = ("token", "template", "validation_split", "init_text", "init_from", "apt", "seed")


def stage_settings(config: dict, stage: str, run: str | None = None) -> str:
    """A stage's --settings: the config sections it reads, as stable JSON, and no more, so that an edit
    reruns only the stages it concerns (Snakemake compares these params between runs)."""
    given = {
        "out_dir": config["out_dir"], "dataset": config["dataset"], "preprocess": config["preprocess"],
        "caption": config["caption"], "model": config["model"], "cache_latents": config["cache_latents"],
        "evaluate": config["evaluate"], "sweeps": config.get("sweeps", {}),
    }
    if stage == "cache_latents":
        given["preprocess"] = {"flip": config["preprocess"]["flip"]}
    if stage in ("train", "evaluate"):
        given["preprocess"] = {"size": config["preprocess"]["size"]}
        merged = {k: v for k, v in run_settings(config, run).items() if k != "name"}
        if stage == "evaluate":  # only what evaluate uses (prompts, held-out images, starting vectors)
            merged = {k: v for k, v in merged.items() if k in EVALUATE_RUN_KEYS}
        given["runs"], given["train"] = {run: merged}, {}
    if stage == "preflight":  # one run's part (or, without a run, every run's), merged, and where its latents' sizes come from
        given["preprocess"] = {"flip": config["preprocess"]["flip"]}
        given["runs"] = {name: {k: v for k, v in run_settings(config, name).items() if k != "name"} for name in ([run] if run else config["runs"])}
        given["train"] = {}
    return to_json({section: given[section] for section in STAGE_SECTIONS[stage] if section in given})


def tagger_files(model: Path | None, tags: Path | None) -> tuple[Path, Path]:
    """The tagger's model.onnx and selected_tags.csv, or a clear error naming the key when either is missing."""
    if model is None:
        raise ConfigError("caption.tagger.model: not set; give the path of the tagger's model.onnx (e.g. from "
                          "SmilingWolf/wd-v1-4-convnext-tagger-v2) or drop tagger from caption.method")
    if not model.is_file():
        raise MissingInput(f"caption.tagger.model: {model} does not exist; give the path of a WD14-style tagger's model.onnx")
    if tags is None or not tags.is_file():
        raise MissingInput(f"caption.tagger.tags: {tags} does not exist; give the selected_tags.csv that came with {model.name}")
    return model, tags


def tagger_inputs(caption: dict) -> list[str]:
    """The tagger's files when caption.method uses it: Snakemake inputs, so replacing either re-captions."""
    methods = [caption["method"]] if isinstance(caption["method"], str) else list(caption["method"])
    if "tagger" not in methods:
        return []
    tagger = caption.get("tagger", {})  # a section as written: the schema leaves model and tags empty when unset
    return [str(path) for path in tagger_files(*tagger_paths(tagger.get("model"), tagger.get("tags")))]


def tagger_paths(model: str | None, tags: str | None) -> tuple[Path | None, Path | None]:
    """caption.tagger.model and .tags as paths; tags defaults to selected_tags.csv beside the model, as the taggers ship."""
    model_path = Path(model) if model else None
    return model_path, Path(tags) if tags else (model_path.with_name("selected_tags.csv") if model_path else None)

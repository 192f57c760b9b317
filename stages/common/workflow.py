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


def caption_methods(caption: dict) -> list[str]:
    """The methods a caption section runs: caption.method's, with the combine step's own methods in its place."""
    methods = [caption["method"]] if isinstance(caption["method"], str) else list(caption["method"])
    combine = caption.get("combine")
    if combine and "combine" not in methods:
        raise ConfigError(f"caption.combine: {combine} is set, but caption.method ({methods}) has no combine step; "
                          "add combine where the joined text belongs, e.g. method: [existing, combine, filename]")
    if "combine" in methods and not combine:
        raise ConfigError("caption.method: combine needs caption.combine, the methods to join in order (e.g. combine: [tagger, blip])")
    used = []
    for method in methods:
        for part in combine if method == "combine" else [method]:
            if part not in used:
                used.append(part)
    return used


def caption_inputs(caption: dict) -> list[str]:
    """Every model file the caption methods read (tagger, DeepDanbooru, BLIP): Snakemake inputs, so replacing one re-captions."""
    methods = caption_methods(caption)
    files = tagger_inputs(caption) if "tagger" in methods else []
    if "deepbooru" in methods:
        files.append(str(deepbooru_file(caption.get("deepbooru", {}).get("model"))))
    if "blip" in methods:
        files += [str(path) for path in blip_files(caption.get("blip", {}).get("model"))]
    return files


def deepbooru_file(model: str | None) -> Path:
    """caption.deepbooru.model as a path, or a clear error when it is not set or not there."""
    where = "(AUTOMATIC1111 keeps it at models/DeepDanbooru/model-resnet_custom_v3.pt)"
    if not model:
        raise ConfigError(f"caption.deepbooru.model: not set; give the path of DeepDanbooru's model-resnet_custom_v3.pt {where} "
                          "or drop deepbooru from caption.method")
    path = Path(model)
    if not path.is_file():
        raise MissingInput(f"caption.deepbooru.model: {path} does not exist or is not a file; give the path of model-resnet_custom_v3.pt {where}")
    return path


BLIP_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
BLIP_TOKENIZER = ("tokenizer.json", "vocab.txt")  # BLIP's tokenizer is BERT's: either file will do


def blip_files(model: str | None) -> list[Path]:
    """The files of the BLIP folder caption.blip.model, or a clear error naming the folder or the file that is missing."""
    how = ("give a folder saved by transformers (a local copy of Salesforce/blip-image-captioning-base or -large: config.json, "
           "model.safetensors, preprocessor_config.json and the tokenizer files)")
    if not model:
        raise ConfigError(f"caption.blip.model: not set; {how}, or drop blip from caption.method")
    folder = Path(model)
    if not folder.is_dir():
        raise MissingInput(f"caption.blip.model: the folder {folder} does not exist; {how}")
    for needed in [("config.json",), BLIP_WEIGHTS, ("preprocessor_config.json",), BLIP_TOKENIZER]:
        if not any((folder / name).is_file() for name in needed):
            raise MissingInput(f"caption.blip.model: {folder / needed[0]} does not exist"
                               + (f" (nor {', '.join(needed[1:])})" if len(needed) > 1 else "") + f"; {how}")
    return sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))


def tagger_inputs(caption: dict) -> list[str]:
    """The tagger's files when caption.method uses it: Snakemake inputs, so replacing either re-captions."""
    if "tagger" not in caption_methods(caption):
        return []
    tagger = caption.get("tagger", {})  # a section as written: the schema leaves model and tags empty when unset
    return [str(path) for path in tagger_files(*tagger_paths(tagger.get("model"), tagger.get("tags")))]


def tagger_paths(model: str | None, tags: str | None) -> tuple[Path | None, Path | None]:
    """caption.tagger.model and .tags as paths; tags defaults to selected_tags.csv beside the model, as the taggers ship."""
    model_path = Path(model) if model else None
    return model_path, Path(tags) if tags else (model_path.with_name("selected_tags.csv") if model_path else None)

"""CLIP similarity of the sample grid's images: likeness to the training images, and editability.

Optional: it runs only when evaluate.clip_model names a local CLIP model in transformers' format
(a folder saved by CLIPModel.save_pretrained, with its tokenizer and image processor). Nothing is
downloaded.

  likeness     the image's mean cosine similarity to each training image. Higher (further right
               on the chart) = more like the training images: the embedding brings the concept in.
  editability  the image's cosine similarity to its prompt with the trigger word left out. Higher =
               the prompt's other words ("on a beach", "as a watercolour") still show; moving down
               = they matter less, the embedding drowns them out (less editable).

Textual Inversion trades one for the other as training goes on: checkpoints usually move right and
down. The baseline point ("without the embedding") is the prompt alone, with nothing learned: it
sets how editable the prompt is and how like the training images the base model already gets.
Raw CLIP cosines are small (about 0.15-0.35 for text, 0.4-0.9 between images); compare points with
each other, not with a fixed scale.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from PIL import Image

from stages.common.errors import InputError, MissingInput
from stages.common.files import atomic_path

TABLE_COLUMNS = ["column", "step", "prompt", "seed", "likeness", "editability"]
SUMMARY_COLUMNS = ["column", "step", "likeness", "editability", "images"]
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_HOW = ("give a folder saved by transformers' CLIPModel.save_pretrained (for example a local copy of "
        "openai/clip-vit-large-patch14), or set {key}: null")


@dataclass
class ClipScorer:
    """A CLIP model with its tokenizer and image processor; features come back L2-normalised on the CPU."""

    model: "torch.nn.Module"
    tokenizer: object
    processor: object
    device: torch.device
    batch_size: int = 16

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", key: str = "evaluate.clip_model") -> "ClipScorer":
        """Load the CLIP model folder at `path` (local files only); `key` is the config key its errors name."""
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        folder = Path(path).expanduser()
        model_type, text_vocab = _check_folder(folder, key)
        safetensors = any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=safetensors, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        if not text_vocab // 2 <= len(tokenizer) <= text_vocab:  # another model's files, or a tokenizer that lost its vocabulary
            raise InputError(f"{key}: the tokenizer in {folder} has {len(tokenizer)} tokens but the {model_type} model's text vocabulary "
                             f"has {text_vocab}; save the tokenizer that belongs to this model into the folder")
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        device = torch.device(device)
        model.requires_grad_(False)
        return cls(model.eval().to(device), tokenizer, processor, device)

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """[n, d] unit vectors, one per image, computed `batch_size` images at a time."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, torch.float32)
            parts.append(_projected(self.model.get_image_features(pixel_values=pixels)))
        return _unit(parts, self.model.config.projection_dim)

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """[n, d] unit vectors, one per text; texts longer than the model's window are cut, as the model would read them."""
        window = self.model.config.text_config.max_position_embeddings
        parts = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True, max_length=window,
                                    return_tensors="pt")
            parts.append(_projected(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                                 attention_mask=tokens["attention_mask"].to(self.device))))
        return _unit(parts, self.model.config.projection_dim)


def _check_folder(folder: Path, key: str) -> tuple[str, int]:
    """Every file loading needs, with a message that names what is missing: (model type, text vocabulary size)."""
    how = _HOW.format(key=key)
    if not folder.exists():
        raise MissingInput(f"{key}: {folder} does not exist; {how}")
    if not folder.is_dir():
        raise InputError(f"{key}: {folder} is a file; {how}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        if any((folder / name).is_file() for name in OPEN_CLIP_FILES):  # LAION's repositories hold both formats side by side
            raise InputError(f"{key}: {folder} holds an open_clip model; only transformers' CLIP format is read. Most open_clip "
                             "models on the Hugging Face Hub (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, for one) also ship it: copy "
                             "config.json, model.safetensors, the tokenizer files and preprocessor_config.json from the same "
                             "repository into the folder, or load the model with transformers' CLIPModel and save_pretrained it")
        hint = " (it is a diffusers Stable Diffusion folder: its text encoder alone cannot score images)" if (folder / "model_index.json").is_file() else ""
        raise MissingInput(f"{key}: {config_file} does not exist{hint}; {how}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{key}: {config_file} is not valid JSON ({error}); {how}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise InputError(f"{key}: {config_file} describes a {model_type!r} model, not a CLIP model (model_type 'clip'). Likeness and "
                         f"editability need CLIP's image and text encoders together, as CLIPModel.save_pretrained writes them; {how}")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((folder / name).is_file() for name in weights):
        raise MissingInput(f"{key}: {folder} has no weights ({' or '.join(weights)}); {how}")
    if not ((folder / "tokenizer.json").is_file() or all((folder / name).is_file() for name in ("vocab.json", "merges.txt"))):
        raise MissingInput(f"{key}: {folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); save the model's "
                           "CLIPTokenizer (or its CLIPProcessor) into the folder with save_pretrained")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise MissingInput(f"{key}: {folder} has no image processor (preprocessor_config.json); save the model's CLIPImageProcessor "
                           "(or its CLIPProcessor) into the folder with save_pretrained")
    return model_type, int(config.get("text_config", {}).get("vocab_size", 49408))


def _projected(output) -> torch.Tensor:
    """The projected features: some transformers versions return them as a tensor, others as the output's pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, width)
    features = torch.cat(parts).float().cpu()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def similarity_table(scorer: ClipScorer, cells: list[dict], training_images: list[Image.Image]) -> pd.DataFrame:
    """One row per grid image: column, step, prompt, seed, likeness, editability.

    `cells` are dicts with column, step (None for the baseline column), prompt (without the trigger
    word), seed and image. Each prompt's text is encoded once; the training images once for all cells.
    """
    if not training_images:
        raise InputError("similarity: no training images to compare the samples with; run preprocess first")
    if not cells:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    training = scorer.image_features(training_images)
    images = scorer.image_features([cell["image"] for cell in cells])
    prompts = list(dict.fromkeys(cell["prompt"] for cell in cells))
    texts = scorer.text_features(prompts)
    text_of = {prompt: texts[i] for i, prompt in enumerate(prompts)}
    likeness = (images @ training.T).mean(dim=1)
    editability = torch.stack([images[i] @ text_of[cell["prompt"]] for i, cell in enumerate(cells)])
    table = pd.DataFrame({
        "column": [cell["column"] for cell in cells],
        "step": pd.array([cell["step"] for cell in cells], dtype="Int64"),  # <NA> for the baseline column
        "prompt": [cell["prompt"] for cell in cells],
        "seed": [int(cell["seed"]) for cell in cells],
        "likeness": likeness.clamp(-1, 1).tolist(),
        "editability": editability.clamp(-1, 1).tolist(),
    })
    return table[TABLE_COLUMNS]


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """One row per grid column, in the order the table first shows it: its step, mean likeness and editability, image count."""
    if table.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    summary = table.groupby("column", sort=False).agg(
        step=("step", "first"), likeness=("likeness", "mean"), editability=("editability", "mean"), images=("likeness", "size"))
    return summary.reset_index()[SUMMARY_COLUMNS]


def tradeoff_points(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(checkpoints in step order, baseline rows): what the trade-off chart draws as a line and as separate markers."""
    baseline = summary["step"].isna()
    return summary[~baseline].sort_values("step", kind="stable"), summary[baseline]


def plot_tradeoff(summary: pd.DataFrame, target: Path) -> None:
    """PNG scatter of each checkpoint's likeness (x) against editability (y), joined in step order, the baseline apart."""
    checkpoints, baseline = tradeoff_points(summary)
    figure, axis = plt.subplots(figsize=(6, 4.5), dpi=100)
    try:
        if not checkpoints.empty:
            axis.plot(checkpoints.likeness, checkpoints.editability, "-o", color="tab:blue", markersize=7, label="checkpoints (in step order)")
            for row in checkpoints.itertuples():
                axis.annotate(str(row.column), (row.likeness, row.editability), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if not baseline.empty:
            axis.plot(baseline.likeness, baseline.editability, "*", color="tab:red", markersize=15, linestyle="none",
                      label="the prompt alone, no embedding")
            for row in baseline.itertuples():
                axis.annotate(str(row.column), (row.likeness, row.editability), textcoords="offset points", xytext=(6, -10), fontsize=8)
        axis.set_xlabel("likeness to the training images (higher = more like them)")
        axis.set_ylabel("editability: match to the prompt\nwithout the trigger (higher = follows it)")
        axis.margins(0.15)  # room for the labels beside the outermost points
        if not summary.empty:
            axis.legend(fontsize=8)
        figure.tight_layout()
        with atomic_path(target) as temp:
            figure.savefig(temp, format="png")
    finally:
        plt.close(figure)

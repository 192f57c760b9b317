"""One run's training settings: built from the schema-checked config, with no defaults of its own.

config.schema.yaml holds every default and allowed value; run_settings merges train.* and
runs.<run> (and the trigger word) once. This record only gives the result names and refuses
combinations that make no sense together.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from stages.common.config import ConfigError, run_settings, section_record_values, validate_config
from stages.common.textual_inversion import AptSettings


@dataclass(frozen=True)
class TrainSettings:
    name: str  # the run: the embedding's file name
    token: str  # its trigger word (the run name unless runs.<run>.token says otherwise)
    init_text: str
    init_from: str | None
    vectors: int
    template: str
    learning_rate: float | str
    lr_scheduler: str
    lr_warmup_steps: int
    optimizer: str
    weight_decay: float
    max_grad_norm: float
    steps: int
    batch_size: int
    grad_accum: int
    repeats: int
    save_every: int
    seed: int
    latent_sampling: str
    validation_split: float  # fraction of images held out of training for evaluate's validation loss
    shuffle_tags: bool
    keep_tokens: int
    tag_dropout: float
    caption_dropout: float
    precision: str
    gradient_checkpointing: bool
    channels_last: bool
    compile: bool
    deterministic: bool
    max_nan_steps: int
    preview_every: int
    preview: dict
    tensorboard: bool
    apt: AptSettings | None  # DreamArtist's APT: also train {run}-neg; None = plain Textual Inversion
    clip_skip: int  # model.clip_skip: the text-encoder layer the embedding is trained on

    def __post_init__(self) -> None:
        if self.preview_every and not self.preview.get("prompt"):
            raise ConfigError(f"runs.{self.name}.preview.prompt: preview_every is {self.preview_every} but there is no preview prompt")

    @classmethod
    def from_section(cls, section: dict, name: str, clip_skip: int) -> "TrainSettings":
        """From one run's merged, schema-checked settings (run_settings); an unknown key is refused."""
        values = section_record_values(cls, dict(section, name=name, clip_skip=clip_skip), f"runs.{name}", "train")
        return cls(**dict(values, apt=AptSettings.from_section(values["apt"])))

    @classmethod
    def from_schema(cls, name: str, model: dict | None = None, **values) -> "TrainSettings":
        """Settings for `name` as if config.yaml said `train: values`: the schema fills the rest (tests, benchmarks)."""
        config = validate_config({"train": values, "model": dict(model or {}), "runs": {name: {}}}, source="settings")
        return cls.from_section(run_settings(config, name), name, config["model"]["clip_skip"])


TRAIN_FIELDS = frozenset(f.name for f in fields(TrainSettings))

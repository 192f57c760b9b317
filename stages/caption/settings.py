"""The caption section of config.yaml as records: methods, existing-caption action, filename rule, the models' settings."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import ConfigError, validate_config
from stages.common.workflow import blip_files, caption_methods, deepbooru_file, tagger_files, tagger_paths

MODEL_METHODS = ("tagger", "deepbooru", "blip")  # the methods that run a model (the others read text that is there)


@dataclass(frozen=True)
class FilenameRule:
    """AUTOMATIC1111's [filewords] options: 'Filename word regex' and 'Filename join string'."""

    word_regex: str
    join: str

    def __post_init__(self):
        try:
            re.compile(self.word_regex)
        except re.error as exc:
            raise ConfigError(f"caption.filename.word_regex: {self.word_regex!r} is not a valid regular expression ({exc})") from None


@dataclass(frozen=True)
class TaggerSettings:
    model: Path | None  # None when the section leaves it empty; required only if the tagger runs
    tags: Path | None
    general_threshold: float
    character_threshold: float
    rating: str  # exclude | first | last
    exclude: tuple[str, ...]
    prefix: tuple[str, ...]
    always_first: tuple[str, ...]
    replace_underscores: bool
    escape_brackets: bool
    sort: str  # confidence | alphabetical
    max_tags: int  # 0 = no limit
    separator: str
    batch_size: int
    threads: int  # 0 = the cores the job was given
    device: str  # auto | cpu | cuda
    scores_min: float

    @classmethod
    def from_section(cls, section: dict) -> "TaggerSettings":
        model, tags = tagger_paths(section["model"], section["tags"])
        values = {key: section[key] for key in section if key not in ("model", "tags")}
        for key in ("exclude", "prefix", "always_first"):
            values[key] = tuple(values[key])
        return cls(model=model, tags=tags, **values)

    def require_files(self) -> tuple[Path, Path]:
        """The model and tags paths, or a clear error when either is missing."""
        return tagger_files(self.model, self.tags)


@dataclass(frozen=True)
class DeepbooruSettings:
    """AUTOMATIC1111's Interrogate options for DeepDanbooru, under the webui's names (modules/shared_options.py)."""

    model: Path | None  # model-resnet_custom_v3.pt; required only if deepbooru runs
    threshold: float  # interrogate_deepbooru_score_threshold
    sort_alpha: bool  # deepbooru_sort_alpha
    use_spaces: bool  # deepbooru_use_spaces
    escape: bool  # deepbooru_escape
    include_ranks: bool  # interrogate_return_ranks
    filter_tags: tuple[str, ...]  # deepbooru_filter_tags, as the webui reads it: split at commas, stripped, spaces → underscores
    batch_size: int
    device: str  # auto | cpu | cuda
    scores_min: float

    @classmethod
    def from_section(cls, section: dict) -> "DeepbooruSettings":
        values = dict(section)
        tags = values["filter_tags"]
        values["filter_tags"] = tuple(tags.split(",") if isinstance(tags, str) else tags)
        values["model"] = Path(values["model"]) if values["model"] else None
        return cls(**values)

    def require_file(self) -> Path:
        return deepbooru_file(str(self.model) if self.model else None)


@dataclass(frozen=True)
class BlipSettings:
    """BLIP captioning as kohya's finetune/make_captions.py runs it (beam search, its length limits), from a local folder."""

    model: Path | None  # a folder saved by transformers; required only if blip runs
    num_beams: int
    min_length: int
    max_length: int
    batch_size: int
    device: str  # auto | cpu | cuda

    def __post_init__(self):
        if self.min_length > self.max_length:
            raise ConfigError(f"caption.blip.min_length: {self.min_length} is more than caption.blip.max_length ({self.max_length}); "
                              "lower min_length or raise max_length")

    @classmethod
    def from_section(cls, section: dict) -> "BlipSettings":
        return cls(**{**section, "model": Path(section["model"]) if section["model"] else None})

    def require_files(self) -> list[Path]:
        return blip_files(str(self.model) if self.model else None)


@dataclass(frozen=True)
class CaptionSettings:
    methods: tuple[str, ...]  # tried in order until one gives text
    existing_action: str
    filename: FilenameRule
    tagger: TaggerSettings
    deepbooru: DeepbooruSettings
    blip: BlipSettings
    combine: tuple[str, ...] = ()  # the methods the combine step joins, in order

    def __post_init__(self):
        caption_methods({"method": list(self.methods), "combine": list(self.combine)})  # combine and method agree, or a ConfigError

    def uses(self, method: str) -> bool:
        """Whether `method` can run: in caption.method, or in caption.combine when the combine step is used."""
        return method in self.methods or ("combine" in self.methods and method in self.combine)

    @property
    def uses_tagger(self) -> bool:
        return self.uses("tagger")

    @classmethod
    def from_section(cls, section: dict | str | list, source: str = "caption settings") -> "CaptionSettings":
        """Validate a caption section (or just a method / list of methods) against the schema, with its defaults."""
        if isinstance(section, (str, list, tuple)):
            section = {"method": list(section) if not isinstance(section, str) else section}
        section = validate_config({"caption": copy.deepcopy(section)}, source=source)["caption"]
        method = section["method"]
        return cls(
            methods=(method,) if isinstance(method, str) else tuple(method),
            existing_action=section["existing_action"],
            filename=FilenameRule(**section["filename"]),
            tagger=TaggerSettings.from_section(section["tagger"]),
            deepbooru=DeepbooruSettings.from_section(section["deepbooru"]),
            blip=BlipSettings.from_section(section["blip"]),
            combine=tuple(section["combine"] or ()),
        )


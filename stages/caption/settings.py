"""The caption section of config.yaml as records: methods, existing-caption action, filename rule, tagger."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from stages.common.config import ConfigError, validate_config
from stages.common.workflow import tagger_files, tagger_paths



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
class CaptionSettings:
    methods: tuple[str, ...]  # tried in order until one gives text
    existing_action: str
    filename: FilenameRule
    tagger: TaggerSettings

    @property
    def uses_tagger(self) -> bool:
        return "tagger" in self.methods

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
        )


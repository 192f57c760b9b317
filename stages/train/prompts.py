"""Training prompts: templates with [name] and [filewords], AUTOMATIC1111 semantics."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_TEMPLATES = ("object", "style", "subject", "subject_filewords", "style_filewords")


def load_template(template: str) -> list[str] | None:
    """Template lines, or None for `captions` (each image's caption is its prompt)."""
    if template == "captions":
        return None
    if template in BUILTIN_TEMPLATES:
        text = resources.files("stages.train.templates").joinpath(f"{template}.txt").read_text(encoding="utf-8")
    else:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(
                f"train.template: {template!r} is neither a built-in template ({', '.join(('captions',) + BUILTIN_TEMPLATES)}) nor an existing .txt file"
            )
        text = path.read_text(encoding="utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"train.template: {template} has no non-empty line")
    return lines


def build_prompt(template_line: str | None, caption: str, trigger: str) -> str:
    """The prompt for one image: the template line (or the caption) with [name] and [filewords] filled.

    With `captions`, a caption that never names the trigger word gets it in front, so every
    prompt trains the embedding.
    """
    if template_line is None:
        if "[name]" in caption:
            return caption.replace("[name]", trigger)
        if trigger in caption.split():
            return caption
        return f"{trigger}, {caption}" if caption else trigger
    return template_line.replace("[name]", trigger).replace("[filewords]", caption).strip(" ,")

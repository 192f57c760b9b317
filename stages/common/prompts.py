"""Training prompts: templates with [name] and [filewords] (AUTOMATIC1111 semantics) and caption augmentation.

Shared by train (which builds the prompts) and caption (whose `tiflow prompts` report shows them)."""
from __future__ import annotations

import random
import re
from importlib import resources
from pathlib import Path
from stages.common.errors import InputError, MissingInput

BUILTIN_TEMPLATES = ("object", "style", "subject", "subject_filewords", "style_filewords")


def load_template(template: str) -> list[str] | None:
    """Template lines, or None for `captions` (each image's caption is its prompt)."""
    if template == "captions":
        return None
    if template in BUILTIN_TEMPLATES:
        text = resources.files("stages.common.data.templates").joinpath(f"{template}.txt").read_text(encoding="utf-8")
    else:
        path = Path(template)
        if not path.is_file():
            raise MissingInput(
                f"train.template: {template!r} is neither a built-in template ({', '.join(('captions',) + BUILTIN_TEMPLATES)}) nor an existing .txt file"
            )
        text = path.read_text(encoding="utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(f"train.template: {template} has no non-empty line")
    return lines


def build_prompt(template_line: str | None, caption: str, trigger: str) -> str:
    """The prompt for one image: the template line (or the caption) with [name] and [filewords] filled.

    With `captions`, a caption that never names the trigger word gets it in front, so every
    prompt trains the embedding.
    """
    caption = caption.replace("[name]", trigger)
    if template_line is None:
        if re.search(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", caption):
            return caption
        return f"{trigger}, {caption}" if caption else trigger
    return template_line.replace("[filewords]", caption).replace("[name]", trigger).strip(" ,")


def augment_caption(caption: str, rng: random.Random, shuffle_tags: bool, keep_tokens: int, tag_dropout: float, caption_dropout: float) -> str:
    """kohya-style caption augmentation on comma-separated tags.

    The first `keep_tokens` tags stay first and are never dropped (kohya counts tags, not CLIP
    tokens); the rest may be shuffled and dropped one by one; with `caption_dropout` the whole
    caption is left out for the step.
    """
    if caption_dropout and rng.random() < caption_dropout:
        return ""
    if not (shuffle_tags or tag_dropout):
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        rest = [tag for tag in rest if rng.random() >= tag_dropout]
    if shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(kept + rest)

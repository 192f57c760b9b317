"""`tiflow prompts`: the prompt and token ids training builds for each image, with warnings.

It reads config.yaml and caption/captions.csv as the workflow does, builds prompts with the
trainer's own template code and tokenises them with the trainer's own token code, so what it
shows is what training feeds the text encoder (before per-step tag shuffling or dropout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages.common.clip_vocab import VOCAB_SIZE, build_clip_tokenizer
from stages.common.config import load_config, run_settings
from stages.common.tokens import PROMPT_TOKEN_BUDGET, add_placeholder_tokens, expand_trigger, placeholder_tokens, tokenize_prompts
from stages.common.prompts import build_prompt, load_template
from stages.common.errors import MissingInput


@dataclass(frozen=True)
class PromptRow:
    run: str
    image: str
    template_line: int | None  # 1-based line of the template file; None with template: captions
    prompt: str  # as build_prompt makes it, with the trigger word
    token_ids: tuple[int, ...]  # <|startoftext|> ... <|endoftext|>, cut to the 77-position window, as training sees them
    token_count: int  # the prompt's tokens before the cut, without start/end markers
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class RunPrompts:
    run: str
    trigger: str
    placeholder_ids: dict[str, int]  # trigger, trigger_1, ... → ids at and above the base vocabulary
    template: str
    augmented: bool  # tags are shuffled or dropped per step, so training sees variants of these prompts
    rows: tuple[PromptRow, ...]


def _prompt_warnings(prompt: str, content_ids: list[int], trigger: str, tokenizer) -> list[str]:
    warnings = []
    if len(content_ids) > PROMPT_TOKEN_BUDGET:
        cut = tokenizer.decode(content_ids[PROMPT_TOKEN_BUDGET:])
        warnings.append(f"runs past the {PROMPT_TOKEN_BUDGET}-token window ({len(content_ids)} tokens); training never sees: {cut!r}")
    new_tokens = [i for i, token in enumerate(content_ids) if token >= VOCAB_SIZE]
    if not new_tokens:
        warnings.append(f"never contains the trigger word {trigger!r}, so this prompt does not train the embedding")
    elif new_tokens[0] >= PROMPT_TOKEN_BUDGET:
        warnings.append(f"the trigger word {trigger!r} comes after the {PROMPT_TOKEN_BUDGET}-token window and is cut off")
    for placeholder in ("[name]", "[filewords]"):
        if placeholder in prompt:
            warnings.append(f"still contains {placeholder} literally (it was not replaced)")
    return warnings


def _read_captions(config: dict) -> pd.DataFrame:
    path = Path(config["out_dir"]) / "caption" / "captions.csv"
    if not path.is_file():
        raise MissingInput(f"{path} does not exist; write the captions first (`snakemake --cores 1 {path}` or `python -m stages.caption`)")
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def build_run_prompts(config: dict, run: str, captions: pd.DataFrame) -> RunPrompts:
    """Every prompt one run trains on: per image, one per template line (or its caption with template: captions)."""
    settings = run_settings(config, run)
    trigger, vectors = settings["token"], settings["vectors"]
    tokenizer = build_clip_tokenizer()
    ids = add_placeholder_tokens(tokenizer, trigger, vectors)  # refuses a trigger the vocabulary already has, as training does
    template = load_template(settings["template"])
    lines = [(None, None)] if template is None else list(enumerate(template, start=1))
    rows = []
    for record in captions.itertuples():
        for number, line in lines:
            prompt = build_prompt(line, record.caption, trigger)
            expanded = expand_trigger(prompt, trigger, vectors)
            content_ids = tokenizer(expanded, add_special_tokens=False).input_ids
            window = tokenize_prompts(tokenizer, [expanded])[0].tolist()
            window = window[: window.index(tokenizer.eos_token_id) + 1]  # drop the padding after <|endoftext|>
            rows.append(PromptRow(run, record.image, number, prompt, tuple(window), len(content_ids),
                                  tuple(_prompt_warnings(prompt, content_ids, trigger, tokenizer))))
    augmented = bool(settings.get("shuffle_tags") or settings.get("tag_dropout") or settings.get("caption_dropout"))
    return RunPrompts(run, trigger, dict(zip(placeholder_tokens(trigger, vectors), ids)), settings["template"], augmented, tuple(rows))


def build_prompt_report(config: dict, run: str | None = None) -> list[RunPrompts]:
    """The prompts of one run, or of every run in the config."""
    runs = [run] if run is not None else list(config["runs"])
    captions = _read_captions(config)
    return [build_run_prompts(config, name, captions) for name in runs]


def format_prompt_report(report: list[RunPrompts]) -> str:
    lines = []
    for run in report:
        tokens = ", ".join(f"{token}={token_id}" for token, token_id in run.placeholder_ids.items())
        lines.append(f"run {run.run}: trigger {run.trigger!r} → new tokens {tokens}; template {run.template}")
        if run.augmented:
            lines.append("  (tags are shuffled or dropped per step; the prompts below are the captions as written)")
        for row in run.rows:
            where = row.image if row.template_line is None else f"{row.image} [template line {row.template_line}]"
            lines.append(f"  {where}")
            lines.append(f"    prompt: {row.prompt}")
            lines.append(f"    ids ({row.token_count}/{PROMPT_TOKEN_BUDGET} tokens): {' '.join(map(str, row.token_ids))}")
            lines.extend(f"    warning: {warning}" for warning in row.warnings)
        warned = sum(1 for row in run.rows if row.warnings)
        lines.append(f"  {len(run.rows)} prompts, {warned} with warnings")
    return "\n".join(lines)


def prompts_command(config_path: Path, run: str | None = None) -> int:
    """`tiflow prompts`: print the report for config_path; 0 even with warnings (they are advice, not refusals)."""
    config = load_config(config_path)
    print(format_prompt_report(build_prompt_report(config, run)))
    return 0

"""Checks that need no image: run when the workflow starts, so a naming mistake costs a second, not a preprocess.

The schema has already checked types and ranges; this checks what needs a file or the tokenizer:
that the image folder, the model and every init_from file exist and parse, that each run's
trigger word is new to the vocabulary and its init text fits its vectors, and that templates
exist. Every message names the key to edit.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.common.config import ConfigError, run_settings
from stages.common.files import write_text_atomic
from stages.common.paths import BUILTIN_PREFIX, DEMO_DATASET


def _key(config: dict, run: str, name: str) -> str:
    """Where a run's setting was written: runs.<run>.<name> when the run overrides it, else train.<name>."""
    return f"runs.{run}.{name}" if name in (config["runs"][run] or {}) else f"train.{name}"


def check_paths(config: dict) -> None:
    images = config["dataset"]["images"]
    if images != DEMO_DATASET and not Path(images).is_dir():
        raise ConfigError(f"dataset.images: {images} is not a folder; give a folder of images, or {DEMO_DATASET}")
    model = config["model"]["path"]
    if model.startswith(BUILTIN_PREFIX):
        from stages.common.builtin import parse_builtin_name

        try:
            parse_builtin_name(model)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    elif not Path(model).exists():
        raise ConfigError(f"model.path: {model} does not exist; give a diffusers folder, a .safetensors/.ckpt file, or builtin:tiny-sd15")
    clip_model = config["evaluate"].get("clip_model")
    if clip_model and not Path(clip_model).expanduser().is_dir():
        raise ConfigError(f"evaluate.clip_model: {clip_model} is not a folder; give a CLIP model folder saved by transformers' "
                          "save_pretrained, or set evaluate.clip_model: null (the report then says how to add one)")


def check_runs(config: dict, memo: Path | None = None) -> None:
    """Each run's trigger word, init text, template and init_from file.

    The tokenizer checks cost a second (loading the CLIP vocabulary); `memo` is a file that
    remembers the word/vector/init-text combinations that passed, so a rerun with nothing new
    to check (Snakemake's no-op rerun) skips loading it.
    """
    from stages.common.prompts import load_template

    words = []
    for run in config["runs"]:
        settings = run_settings(config, run)
        try:
            load_template(settings["template"])
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{_key(config, run, 'template')}: {str(error).removeprefix('train.template: ')}") from None
        # with init_from the file's vectors start the run, not init_text
        words.append((run, settings["token"], settings["vectors"], None if settings.get("init_from") else settings["init_text"]))
        if settings.get("init_from"):
            _check_init_from(config, run, settings)
    passed = _memo_read(memo)
    unchecked = [entry for entry in words if json.dumps(entry[1:]) not in passed]
    if unchecked:
        _check_words(config, unchecked)
        _memo_write(memo, passed | {json.dumps(entry[1:]) for entry in unchecked})


def _check_words(config: dict, words: list[tuple]) -> None:
    from stages.common.clip_vocab import build_clip_tokenizer
    from stages.common.trigger import TokenError, check_trigger, init_token_ids

    tokenizer = build_clip_tokenizer()  # every SD family's text encoders share this vocabulary
    for run, token, vectors, init_text in words:
        try:
            check_trigger(tokenizer, token, vectors)
        except TokenError as error:
            where = f"runs.{run}.token" if "token" in (config["runs"][run] or {}) else f"runs: {run}"
            raise ConfigError(f"{where}: {error}") from None
        if init_text is not None:
            try:
                init_token_ids(tokenizer, init_text, vectors)
            except TokenError as error:
                raise ConfigError(f"{_key(config, run, 'init_text')}: {error}") from None


def _memo_read(memo: Path | None) -> set[str]:
    try:
        return set(json.loads(memo.read_text(encoding="utf-8"))) if memo else set()
    except (OSError, ValueError, TypeError):
        return set()  # no memo, or a damaged one: check everything


def _memo_write(memo: Path | None, passed: set[str]) -> None:
    if memo is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps(sorted(passed)))
    except OSError:
        pass  # a read-only folder only costs the next start its second


def _check_init_from(config: dict, run: str, settings: dict) -> None:
    from stages.common.embedding.read import read_embedding

    key, path = _key(config, run, "init_from"), settings["init_from"]
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} does not exist; give the embedding file to continue from, or remove init_from")
    try:
        embedding = read_embedding(path)
    except (ValueError, OSError) as error:
        raise ConfigError(f"{key}: {path} is not an embedding tiflow can read ({error})") from None
    if embedding.vector_count != settings["vectors"]:
        raise ConfigError(f"{key}: {path} has {embedding.vector_count} vectors; set {_key(config, run, 'vectors')}: {embedding.vector_count}")
    if embedding.step >= settings["steps"]:
        raise ConfigError(f"{_key(config, run, 'steps')}: {settings['steps']} is not past step {embedding.step}, where {path} already is; "
                          f"steps count from the embedding's first step (AUTOMATIC1111's Max steps), so set steps above {embedding.step}")


def check_before_work(config: dict, memo: Path | None = None) -> None:
    """Everything about a validated config that can be checked without reading the images. Raises ConfigError.

    `memo`: where to remember the trigger-word checks that passed (the Snakefile keeps it in .snakemake/).
    """
    check_paths(config)
    check_runs(config, memo)

"""Trigger-word rules: what a new token may be called and how many vectors fit a prompt (no torch needed)."""
from __future__ import annotations
from stages.common.errors import InputError


class TokenError(InputError):
    """A trigger word or init text that cannot work, found before any training."""


PROMPT_TOKEN_BUDGET = 75  # 77 positions minus <|startoftext|> and <|endoftext|>
NEGATIVE_SUFFIX = "-neg"  # DreamArtist's name for an APT run's negative embedding: {run}-neg, used in the negative prompt


def placeholder_tokens(trigger: str, vectors: int) -> list[str]:
    """The tokenizer entries one embedding occupies: trigger, trigger_1, ... (diffusers' naming)."""
    return [trigger] + [f"{trigger}_{i}" for i in range(1, vectors)]


def check_trigger(tokenizer, trigger: str, vectors: int) -> None:
    """Refuse a trigger word that the vocabulary already has, or more vectors than a prompt holds."""
    pieces = tokenizer.tokenize(trigger)
    if len(pieces) == 1 and pieces[0] in tokenizer.get_vocab():
        raise TokenError(
            f"trigger word {trigger!r} is already the vocabulary token {pieces[0]!r}; training it would change "
            f"what {trigger!r} means in every prompt. Rename the run (or set token:) to a made-up word such as {trigger}tok"
        )
    if vectors > PROMPT_TOKEN_BUDGET - 1:
        raise TokenError(f"vectors={vectors} leaves no room in the {PROMPT_TOKEN_BUDGET}-token prompt window; use at most {PROMPT_TOKEN_BUDGET - 1}")


def init_token_ids(tokenizer, init_text: str, vectors: int) -> list[int]:
    """The token ids init_text starts the vectors from ([] for an empty text: zeros), or a TokenError saying why not.

    More tokens than vectors is refused (SPEC §5): AUTOMATIC1111 would silently drop the words that do not fit.
    """
    if not init_text.strip():
        return []
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not ids:
        raise TokenError(f"init_text {init_text!r} has no tokens; use a word close to the concept, or \"\" to start from zeros")
    if len(ids) > vectors:
        raise TokenError(f"init_text {init_text!r} is {len(ids)} tokens but the embedding has vectors: {vectors}; "
                         f"raise vectors to {len(ids)} or shorten init_text (AUTOMATIC1111 would drop the words that do not fit)")
    return ids

"""Words for counts in messages people read."""


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 file', '3 files', '1 duplicate', '2 near-duplicate pairs'."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"

"""From a tagger's scores to a caption: thresholds per category, rating, exclusions, order, formatting."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.caption.settings import TaggerSettings
from stages.caption.tag_table import CHARACTER, RATING, TagTable

# Kaomoji whose underscore is part of the face; the WD14 tagger's author and the webui
# extension keep them as written. kohya keeps any tag of 3 characters or fewer, which
# catches the same faces; both rules are applied.
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})


@dataclass(frozen=True)
class TagChoice:
    """The tags one image's caption is made of: indices into the tag table, in caption order."""

    tags: tuple[int, ...]  # general and character tags, after exclusions, ordering and max_tags
    rating: int | None  # the best-scoring rating tag, when the settings ask for one


def display_name(tag: str, settings: TaggerSettings) -> str:
    """A tag as it is written in a caption: underscores → spaces (kaomoji kept), brackets escaped if asked."""
    if settings.replace_underscores and tag not in KAOMOJI and len(tag) > 3:
        tag = tag.replace("_", " ")
    if settings.escape_brackets:
        for bracket in "\\()[]":  # the backslash first, so escapes are not escaped twice
            tag = tag.replace(bracket, "\\" + bracket)
    return tag


def _normalised(tag: str) -> str:
    return tag.strip().lower().replace("_", " ")


def choose_tags(scores: np.ndarray, table: TagTable, settings: TaggerSettings) -> TagChoice:
    """Pick and order the tags of one image from its scores (one per row of `table`)."""
    categories = table.categories
    threshold = np.where(categories == CHARACTER, settings.character_threshold, settings.general_threshold).astype(np.float32)
    passing = (scores >= threshold) & (categories != RATING)
    excluded = {_normalised(tag) for tag in settings.exclude}
    candidates = [i for i in np.flatnonzero(passing) if _normalised(table.names[i]) not in excluded]
    if settings.sort == "alphabetical":
        candidates.sort(key=lambda i: display_name(table.names[i], settings))
    else:  # best first; ties by name, so equal scores give the same caption on every run
        candidates.sort(key=lambda i: (-float(scores[i]), table.names[i]))
    first = [_normalised(tag) for tag in settings.always_first]
    by_name = {_normalised(table.names[i]): i for i in candidates}
    moved = [by_name[tag] for tag in dict.fromkeys(first) if tag in by_name]
    ordered = moved + [i for i in candidates if i not in moved]
    if settings.max_tags:
        ordered = ordered[: settings.max_tags]
    rating = None
    if settings.rating != "exclude":
        ratings = [i for i in np.flatnonzero(categories == RATING) if _normalised(table.names[i]) not in excluded]
        if ratings:  # kohya: the rating with the highest score, whatever the threshold
            rating = max(ratings, key=lambda i: (float(scores[i]), -i))
    return TagChoice(tuple(int(i) for i in ordered), None if rating is None else int(rating))


def format_caption(choice: TagChoice, table: TagTable, settings: TaggerSettings) -> str:
    """The caption text: prefix, [rating first], tags, [rating last], joined by the separator."""
    tags = [display_name(table.names[i], settings) for i in choice.tags]
    if choice.rating is not None:
        rating = display_name(table.names[choice.rating], settings)
        tags = [rating] + tags if settings.rating == "first" else tags + [rating]
    prefix = [tag for tag in settings.prefix if tag.strip()]
    seen = {_normalised(tag) for tag in prefix}
    tags = prefix + [tag for tag in tags if _normalised(tag) not in seen]  # a prefix tag found by the tagger is not written twice
    return settings.separator.join(tags)


def caption_from_scores(scores: np.ndarray, table: TagTable, settings: TaggerSettings) -> tuple[str, TagChoice]:
    choice = choose_tags(scores, table, settings)
    return format_caption(choice, table, settings), choice

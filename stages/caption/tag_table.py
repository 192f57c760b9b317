"""A WD14 tagger's selected_tags.csv: one row per model output, with the tag's name and category."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from stages.common.errors import InputError, MissingInput

# Danbooru categories as the WD14 taggers' selected_tags.csv numbers them
GENERAL, CHARACTER, RATING = 0, 4, 9
CATEGORY_NAMES = {GENERAL: "general", CHARACTER: "character", RATING: "rating"}


@dataclass(frozen=True)
class TagTable:
    path: Path
    names: tuple[str, ...]  # as written in the file (long_hair), in model output order
    categories: np.ndarray  # int, one per name; categories other than 4 and 9 take the general threshold

    def __len__(self) -> int:
        return len(self.names)

    def category_names(self, indices: np.ndarray) -> list[str]:
        return [CATEGORY_NAMES.get(int(c), f"category {int(c)}") for c in self.categories[indices]]


def load_tag_table(path: Path) -> TagTable:
    """Read selected_tags.csv (columns tag_id, name, category, count); refuse anything else by name."""
    if not path.is_file():
        raise MissingInput(f"caption.tagger.tags: {path} does not exist; give the selected_tags.csv that came with the tagger model")
    try:
        # keep_default_na=False: tags such as "null" or "na" are names, not missing values
        table = pd.read_csv(path, dtype={"name": str}, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"caption.tagger.tags: {path} is not a readable CSV file ({exc})") from None
    missing = [column for column in ("name", "category") if column not in table.columns]
    if missing:
        raise InputError(f"caption.tagger.tags: {path} has no {' or '.join(missing)} column (found: {', '.join(map(str, table.columns))}); "
                         "a WD14 selected_tags.csv has tag_id, name, category, count")
    if table.empty:
        raise InputError(f"caption.tagger.tags: {path} lists no tags")
    categories = pd.to_numeric(table["category"], errors="coerce")
    bad = categories.isna() | (categories != categories.round())
    if bad.any():
        row = int(bad.idxmax())
        raise InputError(f"caption.tagger.tags: {path} row {row + 2}: category {table['category'][row]!r} is not a whole number (0 general, 4 character, 9 rating)")
    return TagTable(path=path, names=tuple(table["name"]), categories=categories.to_numpy(dtype=np.int64))

"""Choosing each image's caption and writing caption/{image}.txt plus captions.csv."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from stages.common.files import write_csv_atomic, write_text_atomic

log = logging.getLogger(__name__)

METHODS = ("existing", "filename", "none")


def caption_from_filename(source_name: str) -> str:
    """AUTOMATIC1111's [filewords] rule: drop the extension and leading digits/dashes.

    '000001-1-a man in suit.png' → 'a man in suit'
    """
    stem = Path(source_name).stem
    return re.sub(r"^[\d\s-]+", "", stem).replace("_", " ").strip()


def write_captions(preprocess_dir: Path, out_dir: Path, method: str) -> pd.DataFrame:
    """Write one UTF-8 caption per image listed in preprocess_dir/manifest.csv; return the captions table."""
    if method not in METHODS:
        raise ValueError(f"caption.method: {method!r} is not available in this version; use one of {', '.join(METHODS)}")
    manifest = pd.read_csv(preprocess_dir / "manifest.csv", keep_default_na=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for record in manifest.itertuples():
        if method == "existing" and record.caption:
            text, origin = (preprocess_dir / record.caption).read_text(encoding="utf-8").strip(), "sidecar"
        elif method == "filename":
            text, origin = caption_from_filename(record.source), "filename"
        else:
            text, origin = "", "none"
        if method == "existing" and not record.caption:
            log.info("%s has no caption sidecar; its caption is empty", record.source)
        caption_file = Path(record.output).with_suffix(".txt").name
        write_text_atomic(out_dir / caption_file, text)
        rows.append({"image": record.output, "caption_file": caption_file, "caption": text, "source": origin})
    table = pd.DataFrame(rows, columns=["image", "caption_file", "caption", "source"])
    keep = set(table.caption_file)
    for stale in out_dir.glob("*.txt"):
        if stale.name not in keep:
            stale.unlink()
    write_csv_atomic(out_dir / "captions.csv", table)
    return table

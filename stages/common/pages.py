"""What every tiflow HTML page shares: its style sheet, how it writes numbers, and the way to the pre-flight report."""
from __future__ import annotations

import os
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f4f4f4; } td.left, th.left { text-align: left; } tr.best { background: #e6f4e6; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ccc; } figure { margin: 1.5em 0; } figcaption { color: #555; }
.warn { background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; }
tr.outlier { background: #fde2e2; } td.hint { text-align: left; max-width: 420px; font-size: 0.9em; }
nav a { margin-right: 1em; }
"""


def format_number(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def preflight_page_link(evaluate_root: Path, page_folder: Path) -> str | None:
    """The pre-flight report ({out_dir}/preflight/index.html, beside evaluate/) relative to a page in page_folder;
    None until the workflow has written it."""
    page = evaluate_root.resolve().parent / "preflight" / "index.html"
    return os.path.relpath(page, page_folder.resolve()) if page.is_file() else None

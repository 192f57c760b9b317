"""evaluate/index.html: every run side by side, from each run's metrics.json and pictures."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pandas as pd

from stages.common.files import write_text_atomic
from stages.common.charts import step_chart
from stages.common.pages import STYLE, format_number, preflight_page_link
from stages.common.errors import MissingInput


def plot_runs(evaluate_dir: Path, runs: list[str], target: Path) -> None:
    """Every run's validation loss per checkpoint on one chart (the start as the first point of each line)."""
    with step_chart(target, "validation loss") as axis:
        for run in runs:
            table = pd.read_csv(evaluate_dir / run / "val_loss.csv")
            axis.plot(table.step, table.val_loss, "o-", label=run)
        axis.ticklabel_format(axis="y", useOffset=False)  # runs that differ in the 6th digit: show the numbers, not "1e-8+1.13"


def _metrics(evaluate_dir: Path, run: str) -> dict:
    metrics_file = evaluate_dir / run / "metrics.json"
    for needed in (metrics_file, evaluate_dir / run / "val_loss.csv"):
        if not needed.is_file():
            raise MissingInput(f"{needed} does not exist; run the evaluate stage for {run!r} first")
    return json.loads(metrics_file.read_text(encoding="utf-8"))


def rank_sweep(metrics: dict[str, dict]) -> list[str]:
    """A sweep's runs, best first: lowest validation loss of their best checkpoint, then the earlier best step."""
    def key(run: str) -> tuple:
        loss = metrics[run].get("val_loss_best")
        return (loss is None, loss if loss is not None else 0.0, metrics[run]["best_step"], run)
    return sorted(metrics, key=key)


def sweep_section(evaluate_dir: Path, sweep: str, points: dict[str, dict]) -> str:
    """One sweep's runs ranked in a table with their grid values, and their sample grids side by side in that order."""
    metrics = {run: _metrics(evaluate_dir, run) for run in points}
    ranked = rank_sweep(metrics)
    keys = list(next(iter(points.values())))
    header = "".join(f"<th>{escape(key)}</th>" for key in keys)
    rows = []
    for rank, run in enumerate(ranked, start=1):
        values = "".join(f"<td>{escape(str(points[run][key]))}</td>" for key in keys)
        m, name = metrics[run], escape(run)
        rows.append(f'<tr><td>{rank}</td><td class="left"><a href="{name}/index.html">{name}</a></td>{values}'
                    f'<td>{m["best_step"]}</td><td>{format_number(m["val_loss_best"])}</td><td>{format_number(m["val_loss_start"])}</td></tr>')
    cards = "".join(f'<figure><a href="{escape(run)}/index.html"><img src="{escape(run)}/grid.png" alt="{escape(run)} samples"></a>'
                    f"<figcaption>#{rank} {escape(', '.join(f'{k} {v}' for k, v in points[run].items()))}</figcaption></figure>"
                    for rank, run in enumerate(ranked, start=1))
    return f"""<h2>Sweep {escape(sweep)}: {len(ranked)} runs, trigger word {escape(sweep)}</h2>
<p class="sub">Ranked by the validation loss of each run's best checkpoint (lower is better), then by the earlier best step.</p>
<table><tr><th>rank</th><th class="left">run</th>{header}<th>best step</th><th>val loss, best</th><th>val loss, start</th></tr>
{chr(10).join(rows)}
</table>
<div class="sweep">{cards}</div>"""


def _image_flag(name: str, metrics: dict) -> str:
    """The run's outlier images (evaluate's per-image loss), linked to its ranking."""
    outliers = metrics.get("image_outliers")
    if outliers is None:
        return "–"
    if not outliers:
        return "none"
    return f'<a href="{name}/index.html#images">{escape(", ".join(outliers[:3]))}{" …" if len(outliers) > 3 else ""}</a>'


def _preflight_link(evaluate_dir: Path) -> str:
    """A paragraph linking the pre-flight report, when the workflow wrote one."""
    page = preflight_page_link(evaluate_dir, evaluate_dir)
    if page is None:
        return ""
    return (f'<p><a href="{escape(page)}">Pre-flight report</a>: the images, buckets and token budgets every run '
            "trained on, the measured time per step and memory, and settings known to fail.</p>")


def write_overview(evaluate_dir: Path, runs: list[str], sweeps: dict[str, dict[str, dict]] | None = None) -> Path:
    """Write evaluate_dir/index.html and val_loss.png comparing `runs`; each needs evaluate_dir/<run>/metrics.json.

    `sweeps` ({sweep: {run: grid point}}, config.sweep_points) adds a ranked section per sweep.
    """
    rows, cards = [], []
    for run in runs:
        metrics = _metrics(evaluate_dir, run)
        name = escape(run)
        change = metrics.get("val_loss_best_vs_start")
        flag = "" if metrics.get("beats_start", True) else '<br><span class="warn">never beats the start</span>'
        rows.append(
            f'<tr><td class="left"><a href="{name}/index.html">{name}</a>{flag}</td><td class="left">{escape(metrics["token"])}</td>'
            f'<td>{metrics["final_step"]}</td><td>{metrics["best_step"]}</td><td>{format_number(metrics["val_loss_start"])}</td>'
            f'<td>{format_number(metrics["val_loss_best"])}</td><td>{f"{change * 100:+.1f}%" if change is not None else "–"}</td>'
            f'<td class="left">{escape(metrics["validation_set"])} ({metrics["validation_images"]})</td>'
            f'<td class="left"><a href="{name}/best/{name}.safetensors">best/{name}.safetensors</a></td>'
            f'<td class="left">{_image_flag(name, metrics)}</td>'
            f'<td class="left"><a href="{name}/index.html#baseline">with/without</a> · <a href="{name}/index.html#images">images</a> · '
            f'<a href="{name}/index.html#similarity">likeness</a></td></tr>'
        )
        cards.append(f'<figure><a href="{name}/index.html"><img src="{name}/grid.png" alt="{name} samples"></a>'
                     f"<figcaption>{name}: the final embedding</figcaption></figure>")
    plot_runs(evaluate_dir, runs, evaluate_dir / "val_loss.png")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tiflow: {len(runs)} runs</title><style>{STYLE}
figure {{ display: inline-block; vertical-align: top; margin: 0 1em 1em 0; }} figure img {{ max-width: 360px; }}
.sweep {{ white-space: nowrap; overflow-x: auto; }}</style></head>
<body>
<h1>tiflow runs</h1>
<p class="sub">Each run's validation loss is measured on its own fixed noise; compare runs that share images and validation settings.</p>
{_preflight_link(evaluate_dir)}
<table><tr><th class="left">run</th><th class="left">trigger</th><th>steps</th><th>best step</th><th>val loss, start</th>
<th>val loss, best</th><th>change</th><th class="left">validation images</th><th class="left">best file</th><th class="left">images that stand out</th><th class="left">sections</th></tr>
{chr(10).join(rows)}
</table>
<figure><img src="val_loss.png" alt="validation loss of every run"><figcaption>Validation loss per checkpoint,
each run from its start.</figcaption></figure><br>
{chr(10).join(cards)}
{chr(10).join(sweep_section(evaluate_dir, sweep, points) for sweep, points in (sweeps or {}).items())}
</body></html>
"""
    target = evaluate_dir / "index.html"
    write_text_atomic(target, page)
    return target

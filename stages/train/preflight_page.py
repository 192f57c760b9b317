"""out/preflight/index.html, preflight.json and aspect_ratios.png: every run's part of the pre-flight report, assembled.

It needs no model and no torch (every run's part, preflight_report.run_preflight, is already
written), so the page costs the workflow a second, not a model load.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pandas as pd

from stages.common.charts import chart
from stages.common.files import write_text_atomic
from stages.common.pages import STYLE, format_number
from stages.common.text import plural
from stages.common.layout import StageDirs
from stages.common.trigger import PROMPT_TOKEN_BUDGET

LISTED = 20  # files named per problem on the page; the JSON has them all


def image_facts(preprocess_dir: Path) -> dict:
    """Kept, skipped and duplicate images, and each kept source's aspect ratio, from preprocess's tables."""
    manifest = pd.read_csv(preprocess_dir / "manifest.csv", keep_default_na=False)
    skipped_path = preprocess_dir / "skipped.csv"
    skipped = pd.read_csv(skipped_path, keep_default_na=False) if skipped_path.is_file() else pd.DataFrame(columns=["file", "reason"])
    is_duplicate = skipped.reason.str.startswith("duplicate")
    near_path = preprocess_dir / "near_duplicates.csv"
    near = len(pd.read_csv(near_path)) if near_path.is_file() else 0
    sources = manifest.drop_duplicates("source")
    return {
        "sources_kept": len(sources),
        "images": len(manifest),  # a split source gives several
        "skipped": [{"file": r.file, "reason": r.reason} for r in skipped[~is_duplicate].itertuples()],
        "duplicates": [{"file": r.file, "reason": r.reason} for r in skipped[is_duplicate].itertuples()],
        "near_duplicate_pairs": near,
        "aspect_ratios": [round(float(r.width) / float(r.height), 4) for r in sources.itertuples() if float(r.height) > 0],
    }


def assemble_preflight(config: dict, runs: dict[str, dict]) -> dict:
    """preflight.json's content from each run's part (run_preflight): the images once, and each distinct timing once."""
    report = {"images": image_facts(StageDirs(config["out_dir"]).preprocess), "model": config["model"]["path"], "runs": {}, "timings": []}
    seen: dict[str, int] = {}
    for run, facts in runs.items():
        timing = dict(facts["timing"])
        key = json.dumps(timing, sort_keys=True)
        if key not in seen:
            seen[key] = len(report["timings"])
            report["timings"].append({"runs": [], **timing})
        report["timings"][seen[key]]["runs"].append(run)
        report["runs"][run] = {**facts, "timing": seen[key]}
    report["warnings"] = [warning for facts in report["runs"].values() for warning in facts["warnings"]]
    return report




def plot_aspect_ratios(ratios: list[float], target: Path) -> None:
    """A histogram of width / height over the kept source images, with the square and common photo ratios marked."""
    with chart(target, "aspect ratio of the source image (width / height)", "images", size=(7, 3)) as axis:
        axis.hist(ratios or [1.0], bins=min(30, max(5, len(set(ratios)))), color="#4a7ab5", edgecolor="white")
        for ratio, label in ((2 / 3, "2:3"), (1.0, "1:1"), (1.5, "3:2"), (16 / 9, "16:9")):
            axis.axvline(ratio, color="#aaa", linestyle=":", linewidth=1)
            axis.text(ratio, axis.get_ylim()[1] * 0.95, label, ha="center", va="top", fontsize=8, color="#666")


def _listed(items: list[dict], describe) -> str:
    shown = "".join(f"<li>{describe(item)}</li>" for item in items[:LISTED])
    more = f"<li>… and {len(items) - LISTED} more (preflight.json lists them all)</li>" if len(items) > LISTED else ""
    return f"<ul>{shown}{more}</ul>" if items else ""


def _images_section(images: dict) -> str:
    skipped, duplicates = images["skipped"], images["duplicates"]
    return f"""<h2 id="images">Images</h2>
<table>
<tr><th class="left">kept (source images)</th><td>{images["sources_kept"]}</td></tr>
<tr><th class="left">training images written</th><td>{images["images"]}</td></tr>
<tr><th class="left">skipped</th><td>{len(skipped)}</td></tr>
<tr><th class="left">duplicates collapsed</th><td>{len(duplicates)}</td></tr>
<tr><th class="left">near-duplicate pairs (preprocess/near_duplicates.csv)</th><td>{images["near_duplicate_pairs"]}</td></tr>
</table>
{_listed(skipped, lambda s: f"{escape(Path(s['file']).name)}: {escape(s['reason'])}")}
{_listed(duplicates, lambda s: escape(s['reason']))}
<figure id="aspect"><img src="aspect_ratios.png" alt="histogram of the source images' aspect ratios"><figcaption>The kept source
images' shapes. One tall bar means one crop fits all; bars spread far from 1:1 lose the most to a square crop
(preprocess.mode: center), so consider preprocess.mode: bucket, and check the buckets below.</figcaption></figure>"""


def _timing_section(report: dict) -> str:
    rows = "\n".join(
        f'<tr><td class="left">{escape(", ".join(t["runs"]))}</td><td>{escape(t["device"])}</td><td>{escape(t["precision"])}</td>'
        f'<td>{t["batch_size"]}{" × " + str(t["grad_accum"]) if t["grad_accum"] > 1 else ""}</td>'
        f'<td>{t["bucket"]}</td><td>{format_number(t["seconds_per_step"], 3)}</td>'
        f'<td>{t["peak_memory_bytes"] / 2**30:.2f} GiB</td></tr>' for t in report["timings"])
    totals = "\n".join(f'<tr><td class="left">{escape(run)}</td><td>{facts["steps"]}</td><td>{_duration(facts["estimated_training_seconds"])}</td></tr>'
                       for run, facts in report["runs"].items())
    kinds = sorted({t["memory_kind"] for t in report["timings"]})
    return f"""<h2 id="cost">Time and memory</h2>
<p>Measured, not guessed: a few real training steps of each setting on this machine's device, at the largest bucket
(the most memory a step takes). The time per step is the median of the timed steps; peak memory is {escape(" / ".join(kinds))}.</p>
<table><tr><th class="left">runs</th><th>device</th><th>precision</th><th>batch</th><th>largest bucket</th><th>seconds / step</th><th>peak memory</th></tr>
{rows}
</table>
<table><tr><th class="left">run</th><th>steps</th><th>training time (steps only; previews, snapshots and evaluate add to it)</th></tr>
{totals}
</table>"""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def _run_section(run: str, facts: dict) -> str:
    tokens, buckets = facts["tokens"], facts["buckets"]
    bucket_rows = "\n".join(
        f'<tr class="{"outlier" if b["latents"] < facts["batch_size"] else ""}"><td>{b["width"]}x{b["height"]}</td><td>{b["latents"]}</td>'
        f'<td>{b["full_batches"]}</td><td>{b["partial_batch"] or "–"}</td></tr>' for b in buckets)
    return f"""<h3 id="run-{escape(run)}">{escape(run)}</h3>
<p>Trigger <code>{escape(facts["token"])}</code>, {plural(facts["vectors"], "vector")}, batch {facts["batch_size"]}, learning rate
{escape(str(facts["learning_rate"]))}, {facts["steps"]} steps.</p>
<table>
<tr><th class="left">prompts training builds (tiflow prompts shows each)</th><td>{tokens["prompts"]}</td></tr>
<tr><th class="left">longest prompt, vectors included</th><td>{tokens["longest_prompt_tokens"]} of {PROMPT_TOKEN_BUDGET} tokens</td></tr>
<tr><th class="left">tokens the vectors take / left in the longest prompt</th><td>{facts["vectors"]} / {max(0, tokens["tokens_left"])}</td></tr>
<tr><th class="left">prompts over {PROMPT_TOKEN_BUDGET} tokens (the end is cut off)</th><td>{len(tokens["over_budget"])}</td></tr>
<tr><th class="left">prompts without the trigger word (they do not train the embedding)</th><td>{len(tokens["missing_trigger"])}</td></tr>
</table>
{_listed(tokens["over_budget"], lambda p: f"{escape(p['image'])}: {p['tokens']} tokens")}
{_listed(tokens["missing_trigger"], lambda p: f"{escape(p['image'])}: {escape(p['prompt'])}")}
<table><tr><th>bucket</th><th>latents a pass (repeats, flips)</th><th>full batches</th><th>partial batch</th></tr>
{bucket_rows}
</table>"""


def write_preflight_page(folder: Path, report: dict) -> Path:
    """preflight.json, aspect_ratios.png and index.html in `folder`; returns the page."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "preflight.json", json.dumps(report, indent=2) + "\n")
    plot_aspect_ratios(report["images"]["aspect_ratios"], folder / "aspect_ratios.png")
    warnings = "".join(f"<li>{escape(w)}</li>" for w in report["warnings"])
    verdict = (f'<div class="warn"><strong>{plural(len(report["warnings"]), "setting")} known to fail:</strong><ul>{warnings}</ul></div>'
               if warnings else "<p>No setting known to fail was found.</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tiflow: pre-flight</title><style>{STYLE}</style></head>
<body>
<h1>Pre-flight</h1>
<p class="sub">What training is about to get and what it will cost, written before any run trains. Model: {escape(report["model"])}.
The numbers are in <a href="preflight.json">preflight.json</a>.</p>
<nav><a href="#images">images</a><a href="#cost">time and memory</a><a href="#runs">runs</a></nav>
{verdict}
{_images_section(report["images"])}
{_timing_section(report)}
<h2 id="runs">Runs: prompts, tokens and buckets</h2>
<p>A red bucket row holds fewer latents a pass than the run's batch_size: its batches are smaller, so its steps count differently.</p>
{"".join(_run_section(run, facts) for run, facts in report["runs"].items())}
</body></html>
"""
    write_text_atomic(folder / "index.html", page)
    return folder / "index.html"

"""index.html: one page per run with the grids, the loss curve, the checkpoints table and the best file."""
from __future__ import annotations

import os
from html import escape
from pathlib import Path

import pandas as pd

from stages.common.files import write_text_atomic
from stages.common.pages import STYLE, format_number

WARNING = ('<p class="warn">No saved checkpoint scores better than the vectors training started from. '
           "Lower train.learning_rate, check the captions (tiflow prompts shows them), or train longer.</p>")


def _validation_set(metrics: dict) -> str:
    if metrics["validation_set"] == "held out":
        return f'{metrics["validation_images"]} images that training never saw (train.validation_split)'
    return (f'the {metrics["validation_images"]} training images: lower means a closer fit, not always a better picture '
            "(set train.validation_split to hold images out)")


def _earlier(trainings: list[dict], page_folder: Path) -> str:
    """Earlier trainings of this run, set aside by a retrain: kept on disk, listed here, not scored."""
    if not trainings:
        return ""
    items = "\n".join(f'<li><a href="{escape(os.path.relpath(t["last_checkpoint"], page_folder))}">{escape(t["last_checkpoint"])}</a> (its last checkpoint)</li>'
                       if t["last_checkpoint"] else f'<li>{escape(t["folder"])}</li>' for t in trainings)
    return f"<h2>Earlier trainings</h2>\n<p>Set aside when a setting changed; scored above only if you train them again.</p>\n<ul>{items}</ul>"


def image_ranking_section(ranking: pd.DataFrame | None, thumbs: dict[str, str]) -> str:
    """The best checkpoint's loss per image, worst first, outliers flagged with a hint (image_loss.csv)."""
    if ranking is None:
        return ""
    rows = "\n".join(
        f'<tr class="{"outlier" if r.outlier else ""}">'
        f'<td>{f"""<img src="thumbs/{escape(thumbs[r.image])}" alt="{escape(r.image)}" width="64">""" if r.image in thumbs else ""}</td>'
        f'<td class="left">{escape(r.image)}</td><td>{escape(r.split)}</td><td>{format_number(r.loss)}</td>'
        f'<td>{r.z_score:+.1f}</td><td class="hint">{escape(r.hint)}</td></tr>'
        for r in ranking.itertuples())
    flagged = int(ranking.outlier.sum())
    verdict = (f"<p class=\"warn\">{flagged} image{'s stand' if flagged != 1 else ' stands'} out (red rows): look at "
               f"{'them' if flagged != 1 else 'it'} before training again.</p>" if flagged else
               "<p>No image stands out (none is more than 2 standard deviations above the mean).</p>")
    return f"""<h2 id="images">Which image hurts</h2>
<p>Each training and held-out image's loss at the best checkpoint, on the same noise and timesteps for every image, so only the
image and its caption differ. The top rows are the images the embedding explains worst; a red row is more than 2 standard
deviations above the mean, with a guess at why. The numbers are in <a href="image_loss.csv">image_loss.csv</a>.</p>
{verdict}
<table><tr><th></th><th class="left">image</th><th>set</th><th>loss</th><th>σ from mean</th><th class="left">hint</th></tr>
{rows}
</table>"""


NO_CLIP_MODEL = ("<p>No CLIP model is set, so the grid images are not scored. To score them, put a CLIP model folder on this "
                 "machine (transformers' layout: <code>CLIPModel.from_pretrained(...).save_pretrained(folder)</code> with its "
                 "tokenizer and image processor, for example a copy of openai/clip-vit-large-patch14 made where the Hub can be "
                 "reached) and set <code>evaluate.clip_model: /path/to/folder</code> in config.yaml. tiflow downloads nothing.</p>")


def similarity_section(similarity: pd.DataFrame | None, clip_model: str | None) -> str:
    """CLIP likeness against editability per checkpoint, or how to get it."""
    head = '<h2 id="similarity">Likeness and editability</h2>'
    if not clip_model:
        return f"{head}\n{NO_CLIP_MODEL}"
    if similarity is None:
        return (f"{head}\n<p>evaluate.clip_model is set, but the scores read baseline.png's images and there is none: set "
                "evaluate.checkpoint_grid above 0 or list evaluate.grid_steps.</p>")
    rows = "\n".join(f'<tr><td class="left">{escape(str(r.column))}</td><td>{format_number(r.likeness)}</td>'
                     f'<td>{format_number(r.editability)}</td><td>{int(r.images)}</td></tr>' for r in similarity.itertuples())
    return f"""{head}
<figure><img src="similarity.png" alt="likeness against editability per checkpoint"><figcaption>Each column of baseline.png
scored by CLIP ({escape(clip_model)}): right = the images look more like the training images, up = the prompt's other words
still show. Training usually moves right and down; the star is the prompt alone. Pick the checkpoint that is far enough
right before it drops too far.</figcaption></figure>
<table><tr><th class="left">column</th><th>likeness</th><th>editability</th><th>images</th></tr>
{rows}
</table>
<p>Per image: <a href="similarity.csv">similarity.csv</a>.</p>"""


def _nav(has_baseline_grid: bool, has_ranking: bool, preflight_page: str | None) -> str:
    links = [("#samples", "samples"), ("#baseline", "with and without the embedding") if has_baseline_grid else None,
             ("#checkpoints", "checkpoints"), ("#images", "which image hurts") if has_ranking else None,
             ("#similarity", "likeness and editability"), (preflight_page, "pre-flight report") if preflight_page else None,
             ("../index.html", "all runs")]
    return "<nav>" + "".join(f'<a href="{escape(href)}">{text}</a>' for href, text in filter(None, links)) + "</nav>"


def write_report(target: Path, metrics: dict, validation: pd.DataFrame, has_checkpoint_grid: bool, has_baseline_grid: bool = False,
                 image_ranking: pd.DataFrame | None = None, thumbs: dict[str, str] | None = None,
                 similarity: pd.DataFrame | None = None, clip_model: str | None = None, preflight_page: str | None = None) -> None:
    """Write the run's page; every picture and file it names is beside it in the evaluate folder."""
    run = escape(metrics["run"])
    change = metrics.get("val_loss_best_vs_start")
    change_text = f"{change * 100:+.1f}%" if change is not None else "–"
    summary = [
        ("trigger word", escape(metrics["token"])),
        ("validation images", f'{metrics["validation_images"]} ({escape(metrics["validation_set"])})'),
        ("final step", metrics["final_step"]),
        ("best step (lowest validation loss)", metrics["best_step"]),
        ("validation loss: start → best", f"{format_number(metrics['val_loss_start'])} → {format_number(metrics['val_loss_best'])} ({change_text})"),
        ("started from", escape(metrics["start"])),
        ("validation loss, final", format_number(metrics["val_loss_final"])),
        ("mean vector norm, final", format_number(metrics["vector_norm_final"])),
        ("training loss, mean of the last 10% of steps", format_number(metrics["train_loss_last_10pct_mean"])),
    ]
    rows = "\n".join(
        f'<tr class="{"best" if int(r.step) == metrics["best_step"] and not r.start else ""}">'
        f'<td>{"start" if r.start else int(r.step)}</td><td>{format_number(r.val_loss)}</td>'
        f'<td>{format_number(r.vector_norm)}</td><td class="left">{escape(str(r.file) if r.start else Path(r.file).name)}</td></tr>'
        for r in validation.itertuples()
    )
    best_links = ", ".join(f'<a href="{escape(f)}">{escape(f)}</a>' for f in metrics["best_files"])
    checkpoint_figure = (
        '<figure><img src="checkpoints.png" alt="checkpoints side by side"><figcaption>The first prompt at a few '
        "checkpoints, same seeds: where the likeness appears and where it starts to overcook.</figcaption></figure>"
        if has_checkpoint_grid else ""
    )
    baseline_figure = (
        '<figure id="baseline"><img src="baseline.png" alt="each prompt without the embedding, then at chosen checkpoints"><figcaption>Each '
        "prompt and seed without the embedding (left: the trigger word replaced by the init text, or removed), then at the "
        "chosen checkpoints (evaluate.grid_steps), same noise in every cell of a row. If the left column already shows your "
        "concept, the prompt gives the likeness, not the embedding.</figcaption></figure>"
        if has_baseline_grid else ""
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tiflow: {run}</title><style>{STYLE}</style></head>
<body>
<h1>{run}</h1>
<p class="sub">Textual Inversion run evaluated by tiflow. Best checkpoint: {best_links}</p>
{_nav(has_baseline_grid, image_ranking is not None, preflight_page)}
<table>{"".join(f'<tr><th class="left">{escape(k)}</th><td>{v}</td></tr>' for k, v in summary)}</table>
{"" if metrics["beats_start"] else WARNING}
<figure id="samples"><img src="grid.png" alt="samples with the final embedding"><figcaption>The final embedding: one row per
evaluate prompt, one column per seed.</figcaption></figure>
{checkpoint_figure}
{baseline_figure}
<figure><img src="loss.png" alt="loss curves"><figcaption>Training loss per step, and each checkpoint's validation loss
on the same {metrics["validation_samples"]} fixed (image, noise, timestep) triples, drawn from {_validation_set(metrics)}.</figcaption></figure>
<h2 id="checkpoints">Checkpoints</h2>
<table><tr><th>step</th><th>validation loss</th><th>mean vector norm</th><th class="left">file</th></tr>
{rows}
</table>
<p>The same numbers are in <a href="val_loss.csv">val_loss.csv</a> and <a href="metrics.json">metrics.json</a>.</p>
{image_ranking_section(image_ranking, thumbs or {})}
{similarity_section(similarity, clip_model)}
{_earlier(metrics.get("earlier_trainings", []), target.parent)}
</body></html>
"""
    write_text_atomic(target, page)

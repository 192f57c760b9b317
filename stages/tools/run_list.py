"""`tiflow runs`: every run the workflow will train, sweeps expanded, with the settings that tell them apart."""
from __future__ import annotations

from pathlib import Path

import yaml
from snakemake.utils import update_config

from stages.common.config import check_yaml_syntax, load_config, own_runs, run_settings, sweep_points, validate_config

SHOWN = ("token", "vectors", "init_text", "learning_rate", "steps", "batch_size")


def load_workflow_config(config: Path, extra: list[Path]) -> dict:
    """config.yaml, with --configfile files merged as Snakemake merges them (and their runs: standing alone)."""
    if not extra:
        return load_config(config)
    check_yaml_syntax(config)
    merged = yaml.safe_load(config.read_text(encoding="utf-8-sig")) or {}
    for path in extra:
        check_yaml_syntax(path)
        update_config(merged, yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {})  # as snakemake --configfile does
    return validate_config(own_runs(merged, extra), source=" + ".join(map(str, [config, *extra])))


def describe_runs(config: dict) -> list[str]:
    """One line per run: its name, the sweep it belongs to, and the settings that most often differ."""
    sweep_of = {run: sweep for sweep, points in sweep_points(config.get("sweeps")).items() for run in points}
    rows = [("run", "sweep", *SHOWN, "apt")]
    for run in config["runs"]:
        settings = run_settings(config, run)
        rows.append((run, sweep_of.get(run, "-"), *(str(settings.get(key)) for key in SHOWN), "yes" if settings.get("apt") else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]

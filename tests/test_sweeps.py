"""Sweeps: a grid of runs sharing one preprocess, caption and cache, ranked side by side; extra config files' own runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from stages.common.config import ConfigError, run_settings, validate_config

SWEEP = {
    "out_dir": "out",
    "preprocess": {"size": 64},
    "sweeps": {"zzq": {"base": {"steps": 2, "save_every": 0}, "grid": {"learning_rate": [0.005, 0.01], "vectors": [1, 2]}}},
    "evaluate": {"seeds": [1], "steps": 2, "validation_samples": 2, "checkpoint_grid": 0},
}
SWEEP_RUNS = ["zzq-learning_rate-0.005-vectors-1", "zzq-learning_rate-0.005-vectors-2",
              "zzq-learning_rate-0.01-vectors-1", "zzq-learning_rate-0.01-vectors-2"]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def planned(result: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """{rule: [run wildcard or ""]} from a dry run's job list."""
    jobs, rule = {}, None
    for line in result.stdout.splitlines():
        if line.startswith("rule ") or line.startswith("localrule "):
            rule = line.split()[1].rstrip(":")
            jobs.setdefault(rule, []).append("")
        elif line.strip().startswith("wildcards: run=") and rule:
            jobs[rule][-1] = line.split("run=")[1].strip()
    return jobs


def workdir_with(tmp_path: Path, config: dict) -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_a_2x2_sweep_expands_to_four_named_runs_that_share_the_stages_and_the_token(tmp_path):
    config = validate_config(json.loads(json.dumps(SWEEP)))
    assert list(config["runs"]) == SWEEP_RUNS  # no demo run: a config with sweeps trains only what it names
    for run in SWEEP_RUNS:
        settings = run_settings(config, run)
        assert settings["token"] == "zzq" and settings["steps"] == 2
    assert [run_settings(config, run)["learning_rate"] for run in SWEEP_RUNS] == [0.005, 0.005, 0.01, 0.01]

    jobs = planned(snakemake(workdir_with(tmp_path, SWEEP), "-n"))
    assert {rule: len(runs) for rule, runs in jobs.items() if rule != "all"} == {
        "preprocess": 1, "caption": 1, "preflight_run": 4, "preflight": 1, "cache_latents": 1, "train": 4, "evaluate": 4, "overview": 1}
    assert sorted(jobs["train"]) == SWEEP_RUNS

    listed = subprocess.run([sys.executable, "-m", "stages.tools.cli", "runs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [row[:3] for row in rows] == [[run, "zzq", "zzq"] for run in SWEEP_RUNS]  # run, sweep, token


def test_changing_one_grid_value_plans_only_the_runs_it_touches(tmp_path):
    workdir = workdir_with(tmp_path, SWEEP)
    summary = snakemake(workdir, "-n", "--summary").stdout.splitlines()
    for line in reversed(summary[1:]):  # stand in for a finished sweep: every output present, older stages' first, recorded by --touch
        output = workdir / line.split("\t")[0]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.touch()
    assert snakemake(workdir, "--touch").returncode == 0
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout

    edited = json.loads(json.dumps(SWEEP))
    edited["sweeps"]["zzq"]["grid"]["learning_rate"] = [0.005, 0.02]
    jobs = planned(snakemake(workdir_with(tmp_path, edited), "-n"))
    assert sorted(jobs["train"]) == ["zzq-learning_rate-0.02-vectors-1", "zzq-learning_rate-0.02-vectors-2"]
    assert sorted(jobs["evaluate"]) == sorted(jobs["train"]) and "overview" in jobs
    assert sorted(jobs["preflight_run"]) == sorted(jobs["train"]) and "preflight" in jobs  # the changed runs' parts, then the page
    assert not {"preprocess", "caption", "cache_latents"} & set(jobs)  # shared, unchanged


def test_a_second_config_file_with_its_own_runs_trains_only_those(tmp_path):
    workdir = workdir_with(tmp_path, {"out_dir": "out", "preprocess": {"size": 64}, "runs": {"demotok": {}, "othertok": {}}})
    (workdir / "mine.yaml").write_text(yaml.safe_dump({"runs": {"minetok": {"vectors": 1}}, "train": {"steps": 3}}))
    jobs = planned(snakemake(workdir, "-n", "--configfile", str(workdir / "mine.yaml")))
    assert jobs["train"] == ["minetok"] and jobs["evaluate"] == ["minetok"]
    jobs = planned(snakemake(workdir, "-n"))  # without it, config.yaml's runs
    assert sorted(jobs["train"]) == ["demotok", "othertok"]
    listed = subprocess.run([sys.executable, "-m", "stages.tools.cli", "runs", "--configfile", "mine.yaml"], cwd=workdir,
                            capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["minetok"] and rows[0][6] == "3", listed.stdout + listed.stderr  # train.steps merged in


def test_sweep_mistakes_name_the_sweep():
    with pytest.raises(ConfigError, match=r"sweeps\.zzq\.grid\.leaning_rate: unknown key; did you mean sweeps\.zzq\.grid\.learning_rate"):
        validate_config({"sweeps": {"zzq": {"grid": {"leaning_rate": [0.01]}}}})
    with pytest.raises(ConfigError, match=r"sweeps\.zzq\.grid\.vectors: 0 is less than the minimum of 1"):
        validate_config({"sweeps": {"zzq": {"grid": {"vectors": [0, 1]}}}})
    with pytest.raises(ConfigError, match=r"sweeps\.zzq: token is the sweep's name"):
        validate_config({"sweeps": {"zzq": {"base": {"token": "x"}, "grid": {"vectors": [1]}}}})
    with pytest.raises(ConfigError, match=r"zzq-vectors-1, which is already a run"):
        validate_config({"runs": {"zzq-vectors-1": {}}, "sweeps": {"zzq": {"grid": {"vectors": [1]}}}})


def test_the_overview_ranks_a_sweeps_runs_and_shows_their_grids_in_that_order(tmp_path):
    from stages.evaluate.overview import write_overview

    losses = {"zzq-vectors-1": (1.2, 4), "zzq-vectors-2": (0.9, 6), "zzq-vectors-3": (0.9, 2)}
    for run, (loss, best) in losses.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.json").write_text(json.dumps({
            "token": "zzq", "final_step": 8, "best_step": best, "val_loss_start": 1.3, "val_loss_best": loss,
            "val_loss_best_vs_start": loss / 1.3 - 1, "validation_set": "training images", "validation_images": 4}))
        (tmp_path / run / "val_loss.csv").write_text("step,val_loss,vector_norm,start,file\n0,1.3,0.1,True,x\n8,1.0,0.2,False,y\n")
    points = {"zzq": {run: {"vectors": int(run[-1])} for run in losses}}
    page = write_overview(tmp_path, list(losses), points).read_text()
    section = page[page.index("Sweep zzq"):]
    order = [section.index(f'<img src="{run}/grid.png"') for run in ("zzq-vectors-3", "zzq-vectors-2", "zzq-vectors-1")]
    assert order == sorted(order)  # equal loss: the earlier best step first; the worst last
    assert section.index(">zzq-vectors-3</a>") < section.index(">zzq-vectors-2</a>") < section.index(">zzq-vectors-1</a>")

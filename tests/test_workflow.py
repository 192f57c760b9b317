"""The Snakemake workflow on a tiny config in a temporary folder: what runs, what reruns, what it leaves."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO

TINY = {
    "out_dir": "out",
    "preprocess": {"size": 64},
    "train": {"steps": 4, "save_every": 2, "learning_rate": 0.01},
    "runs": {"demotok": {"init_text": "cat", "vectors": 2, "validation_split": 0.25}},
    "evaluate": {"prompts": ["a photo of [name]"], "seeds": [1], "steps": 2},
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    return {line.split("rule ")[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("rule ")}


@pytest.fixture(scope="module")
def finished_workflow(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    assert planned_jobs(snakemake(workdir, "-n")) == {"preprocess", "caption", "preflight_run", "preflight", "cache_latents", "train", "evaluate", "overview", "all"}
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_workflow_leaves_the_promised_files(finished_workflow):
    out = finished_workflow / "out"
    for name in ["train/demotok/demotok.safetensors", "train/demotok/demotok.pt", "train/demotok/loss.csv",
                 "train/demotok/steps/demotok-2.safetensors", "evaluate/demotok/grid.png", "evaluate/demotok/loss.png",
                 "evaluate/demotok/val_loss.csv", "evaluate/demotok/metrics.json", "evaluate/demotok/index.html",
                 "evaluate/demotok/checkpoints.png", "evaluate/demotok/best/demotok.safetensors", "evaluate/index.html", "evaluate/val_loss.png",
                 "preprocess/manifest.csv", "preprocess/skipped.csv", "caption/captions.csv", "latents/manifest.csv",
                 "evaluate/demotok/image_loss.csv", "preflight/index.html", "preflight/preflight.json", "preflight/aspect_ratios.png",
                 "preflight/runs/demotok.json"]:
        assert (out / name).is_file(), name
    assert 'href="../preflight/index.html"' in (out / "evaluate/index.html").read_text()  # the overview links the pre-flight report
    assert json.loads((out / "preflight/preflight.json").read_text())["runs"]["demotok"]["timing"] == 0
    metrics = json.loads((out / "evaluate/demotok/metrics.json").read_text())
    assert metrics["validation_set"] == "held out" and metrics["validation_images"] == 2  # the run's split reached evaluate
    grid = Image.open(out / "evaluate/demotok/grid.png")
    assert grid.width == 64 and grid.height > 64  # one seed, one prompt, plus its label


def test_nothing_reruns_when_nothing_changed(finished_workflow):
    result = snakemake(finished_workflow, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-2000:]


def test_a_train_edit_reruns_only_train_evaluate_and_the_preflight_report(finished_workflow):
    edited = dict(TINY, train=dict(TINY["train"], learning_rate=0.02))
    (finished_workflow / "edited.yaml").write_text(yaml.safe_dump(edited))
    result = snakemake(finished_workflow, "-n", "--configfile", str(finished_workflow / "edited.yaml"))
    assert planned_jobs(result) == {"preflight_run", "preflight", "train", "evaluate", "overview", "all"}


def test_a_bad_config_stops_before_any_work(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"stepz": 3}}))
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "train.stepz: unknown key; did you mean train.steps?" in result.stderr
    assert not (tmp_path / "out").exists()


def planned_resources(result: subprocess.CompletedProcess) -> dict[str, dict[str, str]]:
    """rule name → its 'resources:' line of a dry run, as a dict."""
    resources, rule = {}, None
    for line in result.stdout.splitlines():
        if line.strip().startswith(("rule ", "localrule ")):  # a group job's rules are indented
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule:
            resources[rule] = dict(item.split("=", 1) for item in line.split(":", 1)[1].strip().split(", "))
    return resources


def test_the_slurm_profile_sends_each_stage_as_a_job_and_the_model_stages_get_a_gpu(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--profile", str(REPO / "profiles" / "slurm"), "-n"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resources = planned_resources(result)
    assert set(resources) == {"preprocess", "caption", "preflight_run", "preflight", "cache_latents", "train", "evaluate", "overview", "all"}
    for stage in ("preflight_run", "cache_latents", "train", "evaluate"):
        assert resources[stage].get("gpu") == "1", (stage, resources[stage])
    for stage in ("preprocess", "caption", "overview", "preflight"):
        assert "gpu" not in resources[stage], (stage, resources[stage])
    assert int(resources["train"]["runtime"]) > int(resources["preprocess"]["runtime"])
    assert "Group job train_run" in result.stdout  # a run's pre-flight part and its training: one cluster job, one queue wait


def test_a_failed_preprocess_keeps_its_skip_reasons_readable(tmp_path):
    images = tmp_path / "bad"
    images.mkdir()
    (images / "empty.png").write_bytes(b"")
    (images / "fake.jpg").write_bytes(b"this is text, not a JPEG")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"dataset": {"images": str(images)}, "preprocess": {"size": 64},
                                                          "runs": {"zzqtok": {}}}))
    result = snakemake(tmp_path)
    assert result.returncode != 0
    assert not (tmp_path / "out/preprocess/skipped.csv").exists()  # Snakemake removed the failed job's outputs...
    for shown in (result.stderr, (tmp_path / "out/logs/preprocess.log").read_text()):  # ...and the reasons are still there to read
        assert "no usable image" in shown and "empty.png: empty file (0 bytes)" in shown and "fake.jpg: " in shown


def test_the_snakemake_report_holds_the_runs_grid(finished_workflow):
    import base64

    report = finished_workflow / "report.html"
    result = snakemake(finished_workflow, "--report", str(report))
    assert result.returncode == 0, result.stderr[-2000:]
    html = report.read_text()
    grid = (finished_workflow / "out/evaluate/demotok/grid.png").read_bytes()
    assert base64.b64encode(grid).decode() in html  # the picture itself, embedded: the report is one self-contained file
    assert "loss.png" in html and "metrics.json" in html


def test_the_workflow_is_lint_clean():
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(REPO), "--lint"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, result.stdout[-3000:]


def test_on_one_machine_the_gpu_stages_take_turns(tmp_path):
    """The model stages each take every core given, so two never run at once on one machine (one GPU, or the CPU's
    cores); each asks a cluster for one GPU."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "runs": {"demotok": {}, "othertok": {}}}))
    result = snakemake(tmp_path, "-n", "--cores", "3")
    resources, threads, rule = planned_resources(result), {}, None
    for line in result.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("threads:") and rule:
            threads.setdefault(rule, set()).add(int(line.split(":")[1]))
    for stage in ("preflight_run", "cache_latents", "train", "evaluate"):
        assert threads[stage] == {3} and resources[stage].get("gpu") == "1", (stage, threads[stage], resources[stage])
    assert "gpu" not in resources["preprocess"] and "gpu" not in resources["caption"]


def test_adding_or_editing_an_image_reruns_preprocess_and_nothing_else_does(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (80, 80), (60 * index, 90, 30)).save(images / f"photo_{index}.png")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**TINY, "dataset": {"images": str(images)}}))
    # stand in for a finished workflow: every output present, older stages' first (the summary lists the last first)
    for line in reversed(snakemake(tmp_path, "-n", "--summary").stdout.splitlines()[1:]):
        output = tmp_path / line.split("\t")[0]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.touch()
    assert snakemake(tmp_path, "--touch").returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, "-n").stdout  # the folder's listing is unchanged: no rerun

    Image.new("RGB", (80, 80), (255, 0, 0)).save(images / "added.png")
    assert "preprocess" in planned_jobs(snakemake(tmp_path, "-n"))
    assert snakemake(tmp_path, "--touch").returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, "-n").stdout

    Image.new("RGB", (80, 80), (0, 0, 255)).save(images / "photo_1.png")  # the same name, new content
    assert "preprocess" in planned_jobs(snakemake(tmp_path, "-n"))
